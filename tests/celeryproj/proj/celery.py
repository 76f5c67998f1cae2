# The Celery tutorial's proj/celery.py ("Using Celery in your Application"); only the
# settings module (celeryconfig.py) knows about qbroker.
from celery import Celery

app = Celery("proj", include=["proj.tasks"])
app.config_from_object("celeryconfig")

if __name__ == "__main__":
    app.start()
