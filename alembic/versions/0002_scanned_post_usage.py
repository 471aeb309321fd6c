"""Usage columns on agent_scanned_posts.

Counts are NOT NULL with server default 0, so rows scanned before tracking keep their data and
read as "no tracked usage"; agent_model is NULL for them (nobody recorded which model ran).

Revision ID: 0002_scanned_post_usage
Revises: 0001_initial
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_scanned_post_usage"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(20, 10).with_variant(sa.BigInteger(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("agent_scanned_posts") as batch:
        batch.add_column(sa.Column("agent_model", sa.String(128), nullable=True))
        batch.add_column(
            sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.add_column(
            sa.Column("completion_tokens", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("total_cost_usd", MONEY, server_default="0", nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent_scanned_posts") as batch:
        batch.drop_column("total_cost_usd")
        batch.drop_column("completion_tokens")
        batch.drop_column("prompt_tokens")
        batch.drop_column("agent_model")
