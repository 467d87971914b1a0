"""leases.member and reservations.member: the pool member a VM was placed on

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

A configured host may be a pool of several hosts, each with its own CPUs and memory. A
create reserves room on one member and starts its VM there (``VM.start_on``); until the
VM runs, only the reservation says which member's room it holds. Rows from before this
revision have no member: capacity holds them on the pool's master.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("leases", sa.Column("member", sa.String(80), nullable=True))
    op.add_column("reservations", sa.Column("member", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("member")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("member")
