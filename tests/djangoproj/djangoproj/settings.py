# A minimal Django project's settings; the test gives the broker's URL and the database.
import os

BROKER = os.environ["TEST_BROKER_URL"]  # http://127.0.0.1:PORT

SECRET_KEY = "test-only"
DEBUG = True
ALLOWED_HOSTS = ["testserver"]
INSTALLED_APPS = ["shop"]
ROOT_URLCONF = "djangoproj.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["TEST_DB_PATH"],
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

# qclient and qworker read this (no QBROKER_URL in the environment)
QBROKER = {"URL": BROKER}

# Celery, configured with the CELERY_ namespace (config_from_object in celery.py)
CELERY_BROKER_URL = BROKER.replace("http://", "qbroker://")
CELERY_BROKER_TRANSPORT = "qclient.celery:Transport"
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_TASK_SERIALIZER = "json"
