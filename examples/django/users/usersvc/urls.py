from django.urls import path

from . import views

urlpatterns = [
    path("healthz", views.healthz),
    path("api/users/register", views.register),
    path("api/users/token", views.token),
    path("api/users/me", views.me),
]
