"""Orders of the user Portico vouched for (X-User-Id).

GET  /api/orders/             -> 200 {"count", "results": [...]} (newest first, at most 100)
POST /api/orders/ {"item", "quantity"} -> 201 the order
GET  /api/orders/<id>         -> 200 the order, 404 if it is not this user's
GET  /healthz                 -> 200 {"status": "ok"}
"""
from django.db import connection
from django.http import JsonResponse
from rest_framework import serializers, status
from rest_framework.decorators import api_view
from rest_framework.response import Response

from .models import Order

PAGE = 100


class OrderSerializer(serializers.ModelSerializer):
    quantity = serializers.IntegerField(min_value=1, max_value=1000)

    class Meta:
        model = Order
        fields = ["id", "item", "quantity", "created_at"]
        read_only_fields = ["id", "created_at"]


def healthz(request):
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
    return JsonResponse({"status": "ok", "service": "orders"})


@api_view(["GET", "POST"])
def orders(request):
    mine = Order.objects.filter(user_id=request.user.id)
    if request.method == "POST":
        ser = OrderSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        ser.save(user_id=request.user.id)
        return Response(ser.data, status=status.HTTP_201_CREATED)
    return Response({"count": mine.count(),
                     "results": OrderSerializer(mine[:PAGE], many=True).data})


@api_view(["GET"])
def order(request, order_id):
    found = Order.objects.filter(user_id=request.user.id, id=order_id).first()
    if found is None:
        return Response({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
    return Response(OrderSerializer(found).data)
