from django.urls import path

from . import views

urlpatterns = [
    path("healthz", views.healthz),
    path("api/orders/", views.orders),
    path("api/orders/<int:order_id>", views.order),
]
