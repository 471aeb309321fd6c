"""The openai_calls ledger: one row per OpenAI call, keyed by the provider's request id.

The first revision of tokenmeter's own chain (version table ``tokenmeter_alembic_version``).
Before the library had its own chain, the demo application's revision
``0003_openai_calls_ledger`` created this table; a database migrated then already has it, and
this revision adopts it as it is.

Revision ID: tm0001_openai_calls
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0001_openai_calls"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(20, 10).with_variant(sa.BigInteger(), "sqlite")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("openai_calls"):
        return  # created by the application's 0003 before the ledger had its own chain
    op.create_table(
        "openai_calls",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("task_id", sa.String(155), nullable=True),
        sa.Column("task_name", sa.String(255), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), server_default="0", nullable=False),
        sa.Column("scope_kind", sa.String(64), nullable=True),
        sa.Column("scope_ref", sa.String(255), nullable=True),
        sa.Column("hostname", sa.String(255), nullable=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("requested_model", sa.String(128), nullable=True),
        sa.Column("response_model", sa.String(128), nullable=True),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("stream", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("input_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cached_input_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("input_image_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("output_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("reasoning_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("image_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("image_size", sa.String(32), nullable=True),
        sa.Column("image_quality", sa.String(32), nullable=True),
        sa.Column("usage_reported", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("cost_usd", MONEY, nullable=True),
        sa.Column("price_version", sa.String(64), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_type", sa.String(128), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_openai_calls"),
        sa.UniqueConstraint("request_id", name="uq_openai_calls_request_id"),
        sa.UniqueConstraint("execution_id", "seq", name="uq_openai_calls_execution_id_seq"),
    )
    op.create_index("ix_openai_calls_created_at", "openai_calls", ["created_at"])
    op.create_index("ix_openai_calls_model", "openai_calls", ["model"])
    op.create_index("ix_openai_calls_task_id", "openai_calls", ["task_id"])
    op.create_index("ix_openai_calls_scope", "openai_calls", ["scope_kind", "scope_ref"])


def downgrade() -> None:
    op.drop_index("ix_openai_calls_scope", table_name="openai_calls")
    op.drop_index("ix_openai_calls_task_id", table_name="openai_calls")
    op.drop_index("ix_openai_calls_model", table_name="openai_calls")
    op.drop_index("ix_openai_calls_created_at", table_name="openai_calls")
    op.drop_table("openai_calls")
