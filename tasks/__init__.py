"""The application's Celery tasks (commission pipeline, promotion scan)."""
