# Celery's "First steps with Django" proj/celery.py, unchanged.
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproj.settings")

app = Celery("djangoproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
