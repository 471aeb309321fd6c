"""Each call keeps the OpenAI project its client named and a redacted hint of its key, so an
audit against OpenAI's Usage API can tell whose calls the ledger has (never the key itself).

Revision ID: tm0006_project_and_key
Revises: tm0005_ledger_identity
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0006_project_and_key"
down_revision: str | None = "tm0005_ledger_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("openai_calls") as batch:
        batch.add_column(sa.Column("project", sa.String(128), nullable=True))
        batch.add_column(sa.Column("api_key_hint", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("openai_calls") as batch:
        batch.drop_column("api_key_hint")
        batch.drop_column("project")
