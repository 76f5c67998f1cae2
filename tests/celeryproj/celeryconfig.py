# The settings a Celery app changes to run on qbroker; the test gives the URL.
import os

broker_url = os.environ.get("CELERY_BROKER_URL", "qbroker://127.0.0.1:7733")
broker_transport = "qclient.celery:Transport"
result_backend = broker_url
task_track_started = True
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_expires = 3600
# a killed worker's unacked task comes back after at most this many seconds
broker_transport_options = {"lease_timeout": 2.0}
broker_connection_retry_on_startup = True
