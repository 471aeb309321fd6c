"""Celery settings (filled in by the tasks issue: broker, beat schedule, time limits)."""
