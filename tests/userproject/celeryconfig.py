"""The user's Celery settings: kombu's filesystem broker, so no server is needed."""

import os

import settings

_folder = os.path.join(settings.DATA_DIR, "broker")
for _sub in ("queue", "processed"):
    os.makedirs(os.path.join(_folder, _sub), exist_ok=True)

broker_url = "filesystem://"
broker_transport_options = {
    "data_folder_in": os.path.join(_folder, "queue"),
    "data_folder_out": os.path.join(_folder, "queue"),
    "processed_folder": os.path.join(_folder, "processed"),
}
task_ignore_result = True
broker_connection_retry_on_startup = True
