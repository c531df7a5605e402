"""Settings of the example shop: graceful is one app, one dict and two entry points."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["graceful.django"]  # manage.py check: graceful.W001..W004
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "django_shop.urls"
WSGI_APPLICATION = "django_shop.wsgi.application"
ASGI_APPLICATION = "django_shop.asgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
TIME_ZONE = "UTC"

# Over GRACEFUL_* variables; kill_deadline is the platform's (Kubernetes
# terminationGracePeriodSeconds). Under gunicorn the master times the drain from GRACEFUL_*
# variables, so set delay and drain_timeout there (or run with --preload).
GRACEFUL = {"kill_deadline": 30}  # keys: graceful.Config fields, plus kill_deadline
