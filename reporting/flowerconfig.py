# Flower configuration: `celery -A tasks flower --conf=<this file>`; its path, installed:
#   python -c "import tokenmeter.reporting as r, os; print(os.path.dirname(r.__file__))"
# Flower executes this file at start-up; it adds tokenmeter's usage fields to its task views.
import tokenmeter.reporting.flower

tokenmeter.reporting.flower.register()
