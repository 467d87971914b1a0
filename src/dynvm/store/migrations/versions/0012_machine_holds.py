"""machine_holds: existing machines handed out whole ([staticN]): held, resetting or out

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

A static machine is not made and destroyed: it is taken and given back. Which machine a
lease holds lives in the database, beside the lease, so that a restart or a second
replica never hands it out again; taking one is an insert that only one replica wins.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "machine_holds",
        sa.Column("host_ref", sa.String(16), primary_key=True),
        sa.Column("machine", sa.String(128), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("lease_id", sa.String(36), nullable=True),
        sa.Column("label", sa.String(64), nullable=False, server_default=""),
        sa.Column("holder", sa.String(36), nullable=True),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=False, server_default=""),
        sa.CheckConstraint("state IN ('held', 'resetting', 'out')", name="machine_holds_state_known"),
    )


def downgrade() -> None:
    op.drop_table("machine_holds")
