"""WSGI entry point: Django's handler behind graceful (probes first, requests counted)."""

from __future__ import annotations

import os

import graceful.django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_shop.settings")

application = graceful.django.get_wsgi_application()  # instead of django.core.wsgi's
