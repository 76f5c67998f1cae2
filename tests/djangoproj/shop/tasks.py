# Celery tasks, as the Django tutorial writes them (found by autodiscover_tasks).
from celery import shared_task


@shared_task
def add(x, y):
    return x + y
