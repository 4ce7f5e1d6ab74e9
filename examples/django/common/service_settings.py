"""Settings shared by the example services; each service's settings.py
imports these and adds its own apps, URLs and database.

Configuration comes from the environment (examples/django/run sets it):
  DJANGO_SECRET_KEY        required
  DATABASE_PATH            required: this service's SQLite file
  PORTICO_UPSTREAM_SECRET  required: see portico_auth.py
  DJANGO_ALLOWED_HOSTS     comma-separated, default "127.0.0.1,localhost"
  SERVICE_INSTANCE         a name for this process, sent in X-Served-By
"""
import os

from django.core.exceptions import ImproperlyConfigured


def env(name):
    value = os.environ.get(name, "")
    if not value:
        raise ImproperlyConfigured("%s must be set (examples/django/run sets it)" % name)
    return value


SECRET_KEY = env("DJANGO_SECRET_KEY")
DEBUG = False
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
SERVICE_INSTANCE = os.environ.get("SERVICE_INSTANCE", "")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "served_by.served_by",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": env("DATABASE_PATH"),
        # Several gunicorn workers (and instances) share the file: wait for
        # the write lock instead of failing at once.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["portico_auth.PorticoHeaderAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": None,
}

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
