"""ASGI entry point: Django's handler behind graceful (under uvicorn, SIGTERM drains)."""

from __future__ import annotations

import os

import graceful.django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_shop.settings")

application = graceful.django.get_asgi_application()  # instead of django.core.asgi's
