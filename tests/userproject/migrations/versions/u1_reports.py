"""The user's own first revision: the reports table."""

import sqlalchemy as sa
from alembic import op

import tokenmeter

revision = "u1_reports"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=False),
        sa.Column("tokens_out", sa.Integer(), nullable=False),
        sa.Column("cost_usd", tokenmeter.Money(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reports")
