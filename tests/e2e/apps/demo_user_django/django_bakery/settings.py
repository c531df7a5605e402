"""Settings of a small Django bakery for ``graceful demo --app django_bakery.wsgi:application``
(``DJANGO_SETTINGS_MODULE=django_bakery.settings``; tests/e2e/test_demo_app_e2e.py)."""

SECRET_KEY = "demo-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_bakery.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []  # an API: no sessions, no CSRF
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
