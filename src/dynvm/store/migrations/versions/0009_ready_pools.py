"""leases.pooled and leases.pooled_at: VMs kept booted and ready ahead of demand

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

A ready-pool VM ([pools] in the configuration) is a lease like any other — it holds its
room, carries dynvm's marker, is reconciled and recovered as one — that no request has
yet: ``pooled`` is true until a request takes it, in the same transaction that gives it
the request's name and user. ``pooled_at`` says when it joined the pool, and stays once it
is handed out, so the history can tell a warm VM from a cold one.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("leases", sa.Column("pooled", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("leases", sa.Column("pooled_at", sa.Float(), nullable=True))
    op.create_index("ix_leases_pooled_os", "leases", ["pooled", "os"])


def downgrade() -> None:
    op.drop_index("ix_leases_pooled_os", table_name="leases")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("pooled_at")
        batch.drop_column("pooled")
