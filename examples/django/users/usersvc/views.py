"""Accounts and RS256 tokens.

POST /api/users/register {"username", "password"}  -> 201 {"id", "username"}
POST /api/users/token    {"username", "password"}  -> 200 {"access_token", ...}
GET  /api/users/me       (X-User-Id from Portico)  -> 200 {"id", "username", ...}
GET  /healthz                                      -> 200 {"status": "ok"}

The token's "sub" is the user id as a string; Portico's jwt_auth verifies
the signature, issuer, audience and expiry, and forwards "sub" as X-User-Id.
"""
import time
from functools import lru_cache

import jwt
from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.db import IntegrityError, connection
from django.http import JsonResponse
from rest_framework import status
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import AllowAny
from rest_framework.response import Response


def healthz(request):
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
    return JsonResponse({"status": "ok", "service": "users"})


@lru_cache(maxsize=1)
def _private_key():
    with open(settings.JWT_PRIVATE_KEY_FILE, "rb") as f:
        return f.read()


def _credentials(data):
    username = data.get("username") if isinstance(data, dict) else None
    password = data.get("password") if isinstance(data, dict) else None
    if not isinstance(username, str) or not isinstance(password, str):
        return None, None
    return username, password


@api_view(["POST"])
@permission_classes([AllowAny])
def register(request):
    username, password = _credentials(request.data)
    if not username or len(username) > 150 or not username.isalnum():
        return Response({"detail": "username: 1 to 150 letters or digits"},
                        status=status.HTTP_400_BAD_REQUEST)
    if not password or len(password) < 8:
        return Response({"detail": "password: at least 8 characters"},
                        status=status.HTTP_400_BAD_REQUEST)
    try:
        user = User.objects.create_user(username=username, password=password)
    except IntegrityError:
        return Response({"detail": "username taken"}, status=status.HTTP_409_CONFLICT)
    return Response({"id": user.id, "username": user.username}, status=status.HTTP_201_CREATED)


@api_view(["POST"])
@permission_classes([AllowAny])
def token(request):
    username, password = _credentials(request.data)
    user = authenticate(username=username, password=password) if username else None
    if user is None:
        return Response({"detail": "wrong username or password"},
                        status=status.HTTP_401_UNAUTHORIZED,
                        headers={"WWW-Authenticate": 'Bearer realm="api"'})
    now = int(time.time())
    claims = {
        "iss": settings.JWT_ISSUER,
        "aud": settings.JWT_AUDIENCE,
        "sub": str(user.id),
        "name": user.username,
        "iat": now,
        "exp": now + settings.JWT_LIFETIME_S,
    }
    signed = jwt.encode(claims, _private_key(), algorithm="RS256")
    return Response({"access_token": signed, "token_type": "Bearer",
                     "expires_in": settings.JWT_LIFETIME_S})


@api_view(["GET"])
def me(request):
    user = User.objects.filter(id=request.user.id).first()
    if user is None:
        return Response({"detail": "no such user"}, status=status.HTTP_404_NOT_FOUND)
    return Response({"id": user.id, "username": user.username,
                     "date_joined": user.date_joined.isoformat()})
