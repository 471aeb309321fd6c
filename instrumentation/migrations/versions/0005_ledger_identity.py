"""The ledger's identity: one id, created here, that every write-ahead entry, spooled batch and
budget counter carries, so that ledgers sharing a Redis never mix.

Revision ID: tm0005_ledger_identity
Revises: tm0004_billing_dimensions
Create Date: 2026-12-01
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "tm0005_ledger_identity"
down_revision: str | None = "tm0004_billing_dimensions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "tokenmeter_ledger",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tokenmeter_ledger"),
    )
    op.bulk_insert(table, [{"id": uuid.uuid4().hex, "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("tokenmeter_ledger")
