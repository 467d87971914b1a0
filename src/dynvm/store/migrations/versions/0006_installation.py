"""installation: the id that names this dynvm installation in the marker of every VM and
disk; leases.handed_over_at: when the request's VMs were handed over (the lifetime starts)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Made once, here, when the schema is made (or upgraded to this revision), and never
changed: a second dynvm with its own database on the same hosts has another id, and
leaves this one's VMs alone. A database restored from a backup keeps the id.

A lease's lifetime starts when its request hands its VMs over, not when the request
arrives; the reaper expires only leases that were handed over. Leases that were live
before this revision count as handed over when they became ready.
"""

import time
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "installation",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.bulk_insert(table, [{"id": str(uuid.uuid4()), "created_at": time.time()}])
    op.add_column("leases", sa.Column("handed_over_at", sa.Float, nullable=True))
    op.execute("UPDATE leases SET handed_over_at = COALESCE(ready_at, created_at) WHERE state <> 'creating'")


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("handed_over_at")
    op.drop_table("installation")
