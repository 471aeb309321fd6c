"""The application's Celery tasks: commission pipeline and promotion scan.

``celery -A tasks worker --beat`` runs everything.
"""

from tasks.app import app
from tasks.commission import commission
from tasks.promotion import promotion_scan

__all__ = ["app", "commission", "promotion_scan"]
