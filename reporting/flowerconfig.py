# Flower configuration: `celery -A tasks flower --conf=reporting/flowerconfig.py`.
# Flower executes this file at start-up; it adds tokenmeter's usage fields to its task views.
import reporting.flower

reporting.flower.register()
