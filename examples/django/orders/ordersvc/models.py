from django.db import models


class Order(models.Model):
    # The users service owns users: here a user is only the id Portico
    # forwarded (database per service, no foreign key across services).
    user_id = models.BigIntegerField(db_index=True)
    item = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
