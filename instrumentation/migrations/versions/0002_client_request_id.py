"""The ledger keeps each call's X-Client-Request-Id: a call sent but never answered (a timeout,
a connection cut while waiting) has no x-request-id, and this is the id OpenAI logged it under.

Revision ID: tm0002_client_request_id
Revises: tm0001_openai_calls
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0002_client_request_id"
down_revision: str | None = "tm0001_openai_calls"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("openai_calls") as batch:
        batch.add_column(sa.Column("client_request_id", sa.String(512), nullable=True))
    op.create_index("ix_openai_calls_client_request_id", "openai_calls", ["client_request_id"])


def downgrade() -> None:
    op.drop_index("ix_openai_calls_client_request_id", table_name="openai_calls")
    with op.batch_alter_table("openai_calls") as batch:
        batch.drop_column("client_request_id")
