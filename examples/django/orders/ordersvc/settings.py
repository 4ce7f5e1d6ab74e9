"""The orders service: each user's orders, in its own SQLite database
(shared by the instances of this service, not with other services)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))

from service_settings import *  # noqa: E402,F401,F403

INSTALLED_APPS = [
    "rest_framework",
    "ordersvc",
]
ROOT_URLCONF = "ordersvc.urls"
WSGI_APPLICATION = "ordersvc.wsgi.application"
