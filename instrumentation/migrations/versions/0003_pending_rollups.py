"""Rollups that could not apply are kept and retried alone, so the ledger rows they belong to
always land.

Revision ID: tm0003_pending_rollups
Revises: tm0002_client_request_id
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0003_pending_rollups"
down_revision: str | None = "tm0002_client_request_id"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tokenmeter_pending_rollups",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=False),
        sa.Column("task_id", sa.String(155), nullable=True),
        sa.Column("task_name", sa.String(255), nullable=True),
        sa.Column("rollup", sa.Text(), nullable=False),
        sa.Column("calls", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("dead", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tokenmeter_pending_rollups"),
    )
    op.create_index("ix_tokenmeter_pending_rollups_dead", "tokenmeter_pending_rollups", ["dead"])


def downgrade() -> None:
    op.drop_index("ix_tokenmeter_pending_rollups_dead", table_name="tokenmeter_pending_rollups")
    op.drop_table("tokenmeter_pending_rollups")
