from django.http import JsonResponse

from shop.jobs import ship
from shop.models import Order


def order(request, item):
    placed = Order.objects.create(item=item)
    job = ship.delay(placed.id)
    return JsonResponse({"order": placed.id, "job": job.id})
