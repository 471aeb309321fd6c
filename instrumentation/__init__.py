"""tokenmeter: exact OpenAI token and cost metering for Celery workers and scripts.

The whole public surface is here::

    import tokenmeter

    tokenmeter.install(app)                 # a Celery app: every task becomes a usage scope
    tokenmeter.uninstall()                  # exactly undoes install()
    tokenmeter.flush()                      # wait until ended tasks are in the ledger

    tokenmeter.instrument()                 # a plain script: capture every openai call
    with tokenmeter.usage_scope("report", "weekly") as scope:
        client.chat.completions.create(...)
    print(scope.totals)
    tokenmeter.uninstrument()

    # keep a row of your own table equal to a scope's usage
    scope.bind_rollup(tokenmeter.TableRollup(MyRunUsage, key={"run_id": 7},
                                             sums={"tokens_in": "input_tokens"},
                                             cost_column="cost_usd"))

The ledger (``openai_calls``) and its migrations belong to the library: ``tokenmeter migrate``
creates them in your database with their own version table, beside your own tables and Alembic
history.  Settings come from the environment (``tokenmeter.settings``).
"""

if __name__ != "tokenmeter":  # the repository folder `instrumentation/` installs as `tokenmeter`
    raise ImportError(
        f"import tokenmeter, not {__name__}: two names for one package would make two ledgers "
        "of one process (pip install -e . maps the folder to its name)"
    )

from .budgets import BudgetExceeded
from .celery_signals import CeleryMetering, flush, install, uninstall
from .context import (
    CallRecord,
    UsageScope,
    UsageTotals,
    current_scope,
    record_call,
    run_in_scope_thread,
    set_sink,
    usage_scope,
)
from .ledger import OpenAICall
from .migrate import LedgerUnavailable
from .money import Money, to_money
from .openai_hooks import instrument, is_instrumented, track_openai_call, uninstrument
from .rollups import TableRollup

__version__ = "0.2.0"

__all__ = [
    "BudgetExceeded",
    "CallRecord",
    "CeleryMetering",
    "LedgerUnavailable",
    "Money",
    "OpenAICall",
    "TableRollup",
    "UsageScope",
    "UsageTotals",
    "__version__",
    "current_scope",
    "flush",
    "install",
    "instrument",
    "is_instrumented",
    "record_call",
    "run_in_scope_thread",
    "set_sink",
    "to_money",
    "track_openai_call",
    "uninstall",
    "uninstrument",
    "usage_scope",
]
