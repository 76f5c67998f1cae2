# The same project's tasks moved to qworker (docs/migrating-from-celery.md, step 3).
from qworker import task

from shop.models import Order


@task
def ship(order_id):
    order = Order.objects.get(id=order_id)
    order.status = "shipped"
    order.save()
    return order.item
