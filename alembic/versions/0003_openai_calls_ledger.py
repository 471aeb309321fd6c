"""The ledger moved to tokenmeter's own migration chain (kept so databases at 0003 stay valid).

Until the library had its own chain, this revision created ``openai_calls``.  The table is now
tokenmeter's (``tokenmeter migrate``, version table ``tokenmeter_alembic_version``), whose first
revision adopts a table created here.  Upgrading and downgrading this revision change nothing.

Revision ID: 0003_openai_calls_ledger
Revises: 0002_scanned_post_usage
Create Date: 2026-11-24
"""

from collections.abc import Sequence

revision: str = "0003_openai_calls_ledger"
down_revision: str | None = "0002_scanned_post_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
