"""abandoned_clones: clone tasks left running on a host that stopped answering

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "abandoned_clones",
        sa.Column("host_ref", sa.String(16), primary_key=True),
        sa.Column("task", sa.String(128), primary_key=True),
        sa.Column("lease_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("abandoned_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("abandoned_clones")
