"""Adds X-Served-By: SERVICE_INSTANCE to every response, so a client (and
the e2e test) can see which instance behind Portico answered."""
from django.conf import settings


def served_by(get_response):
    def middleware(request):
        response = get_response(request)
        if settings.SERVICE_INSTANCE:
            response["X-Served-By"] = settings.SERVICE_INSTANCE
        return response

    return middleware
