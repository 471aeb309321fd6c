"""The application's tables as they were before usage tracking.

pipeline_run_usages already existed (the seed filled it with an estimated 80/20 split);
agent_scanned_posts had no usage columns yet.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Exact money: NUMERIC(20,10) on PostgreSQL, integer count of 1e-10 USD on SQLite (models.types).
MONEY = sa.Numeric(20, 10).with_variant(sa.BigInteger(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "pipeline_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_pipeline_runs"),
    )
    op.create_table(
        "pipeline_run_usages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline_run_id", sa.Integer(), nullable=False),
        sa.Column("idea_model", sa.String(128), nullable=True),
        sa.Column("image_model", sa.String(128), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cached_prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("image_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("image_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("total_cost_usd", MONEY, server_default="0", nullable=True),
        sa.ForeignKeyConstraint(
            ["pipeline_run_id"],
            ["pipeline_runs.id"],
            name="fk_pipeline_run_usages_pipeline_run_id_pipeline_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_pipeline_run_usages"),
        sa.UniqueConstraint("pipeline_run_id", name="uq_pipeline_run_usages_pipeline_run_id"),
    )
    op.create_table(
        "agent_scanned_posts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("post_id", sa.String(32), nullable=False),
        sa.Column("subreddit", sa.String(128), nullable=False),
        sa.Column("comment_id", sa.String(32), nullable=True),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("post_title", sa.Text(), nullable=True),
        sa.Column("post_score", sa.Integer(), nullable=True),
        sa.Column("promotion_message", sa.Text(), nullable=True),
        sa.Column("rejection_reason", sa.Text(), nullable=True),
        sa.Column("agent_ratings", sa.JSON(), nullable=True),
        sa.Column("scanned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_agent_scanned_posts"),
        sa.UniqueConstraint("post_id", name="uq_agent_scanned_posts_post_id"),
    )


def downgrade() -> None:
    op.drop_table("agent_scanned_posts")
    op.drop_table("pipeline_run_usages")
    op.drop_table("pipeline_runs")
