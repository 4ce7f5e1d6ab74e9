"""The trust boundary between Portico and the Django services.

Portico verifies the client's JWT and forwards the user id in X-User-Id
(jwt_auth's claims_to_headers); it removes any X-User-Id a client sent
(the global headers filter in portico.json) and adds X-Portico-Secret. A
service believes X-User-Id only on a request that carries that secret, so
a client that reaches a service around Portico cannot claim to be anyone.
The services also listen on loopback only in examples/django/run (in
Kubernetes: no Ingress or LoadBalancer for them, a NetworkPolicy allowing
only Portico's pods).

PORTICO_UPSTREAM_SECRET unset or empty means "no secret" and is refused at
startup: a service must not run without the check by accident.
"""
import hmac
import os

from django.core.exceptions import ImproperlyConfigured
from rest_framework import authentication, exceptions


def _secret():
    secret = os.environ.get("PORTICO_UPSTREAM_SECRET", "")
    if len(secret) < 16:
        raise ImproperlyConfigured(
            "PORTICO_UPSTREAM_SECRET must be set (16+ characters): the value Portico sends "
            "in X-Portico-Secret")
    return secret.encode()


SECRET = _secret()


class PorticoUser:
    """The caller Portico vouched for: only an id, no database row here."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, user_id):
        self.id = self.pk = user_id

    def __str__(self):
        return "user %d" % self.id


def came_through_portico(request):
    got = request.META.get("HTTP_X_PORTICO_SECRET", "").encode()
    return hmac.compare_digest(got, SECRET)


class PorticoHeaderAuthentication(authentication.BaseAuthentication):
    """DRF authentication: X-User-Id, believed only with X-Portico-Secret.

    A request without the secret fails even on views that allow anonymous
    callers (registration, tokens): nothing but Portico may call the API.
    """

    def authenticate(self, request):
        if not came_through_portico(request):
            raise exceptions.AuthenticationFailed("requests must come through Portico")
        raw = request.META.get("HTTP_X_USER_ID")
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
            raise exceptions.AuthenticationFailed("malformed X-User-Id")
        return PorticoUser(int(raw)), None

    def authenticate_header(self, request):
        # Makes DRF answer 401 (not 403) when credentials are missing.
        return 'Bearer realm="api"'
