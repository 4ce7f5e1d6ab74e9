"""The users service: accounts and the token issuer.

Besides service_settings' variables it needs JWT_PRIVATE_KEY_FILE (a PEM
RSA private key, 2048 bits or more) to sign tokens.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))

from service_settings import *  # noqa: E402,F401,F403
from service_settings import env  # noqa: E402

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
]
ROOT_URLCONF = "usersvc.urls"
WSGI_APPLICATION = "usersvc.wsgi.application"

JWT_PRIVATE_KEY_FILE = env("JWT_PRIVATE_KEY_FILE")
# Must match the jwt_providers entry in Portico's config.
JWT_ISSUER = "portico-example-users"
JWT_AUDIENCE = "portico-example-api"
JWT_LIFETIME_S = 3600
