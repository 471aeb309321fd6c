"""Each ``tokenmeter audit`` run is kept: its window, what it compared and what it found.

Revision ID: tm0007_audits
Revises: tm0006_project_and_key
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0007_audits"
down_revision: str | None = "tm0006_project_and_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tokenmeter_audits",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bucket", sa.String(4), nullable=False),
        sa.Column("group_by", sa.String(128), nullable=False),
        sa.Column("compared", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("clean", sa.Boolean(), nullable=False),
        sa.Column("differences", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tokenmeter_audits"),
    )
    op.create_index("ix_tokenmeter_audits_created_at", "tokenmeter_audits", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_tokenmeter_audits_created_at", table_name="tokenmeter_audits")
    op.drop_table("tokenmeter_audits")
