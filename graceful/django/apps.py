"""``INSTALLED_APPS += ["graceful.django"]``: registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig


class GracefulConfig(AppConfig):
    name = "graceful.django"
    label = "graceful"
    verbose_name = "graceful-drain"

    def ready(self) -> None:
        import graceful.django.checks  # noqa: F401  (registers the checks)
