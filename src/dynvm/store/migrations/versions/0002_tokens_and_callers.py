"""API tokens, and who asked for each lease

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False, index=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float),
    )
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("caller", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("caller")
    op.drop_table("tokens")
