"""Every billing dimension OpenAI reports: the served service tier, batch, cache-write and audio
tokens, web and file search calls, and what priced each call (its source, and a row name of any
length).  Historical rows keep their numbers; the new counts read 0, the tier NULL.

Revision ID: tm0004_billing_dimensions
Revises: tm0003_pending_rollups
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0004_billing_dimensions"
down_revision: str | None = "tm0003_pending_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTS = (
    "cache_write_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "web_search_calls",
    "file_search_calls",
)


def upgrade() -> None:
    with op.batch_alter_table("openai_calls") as batch:
        batch.add_column(sa.Column("service_tier", sa.String(32), nullable=True))
        batch.add_column(
            sa.Column("batch", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )
        for name in COUNTS:
            batch.add_column(sa.Column(name, sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("price_source", sa.Text(), nullable=True))
        batch.alter_column(
            "price_version", existing_type=sa.String(64), type_=sa.Text(), existing_nullable=True
        )


def downgrade() -> None:
    with op.batch_alter_table("openai_calls") as batch:
        batch.alter_column(
            "price_version", existing_type=sa.Text(), type_=sa.String(64), existing_nullable=True
        )
        batch.drop_column("price_source")
        for name in reversed(COUNTS):
            batch.drop_column(name)
        batch.drop_column("batch")
        batch.drop_column("service_tier")
