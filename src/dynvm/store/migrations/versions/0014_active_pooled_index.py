"""leases: the index on (pooled, os) holds the active leases only

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

Every pools pass reads the pools' VMs, and every getservers reads the ready VMs of its
OS and the leases of other users under its names' first letter; all of them ask for
active leases with ``pooled`` true or false. Through an index on (pooled, os) over every
lease, SQLite went through every pool VM ever recycled (they stay ``pooled``), or every
lease ever handed out, on each read: a cost that grew with the history for as long as
dynvm ran. Made partial, over the active states as ``uq_leases_active_name`` is, the
index holds only what those reads can return.
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

ACTIVE_SQL = "state IN ('creating', 'ready', 'releasing')"


def upgrade() -> None:
    op.drop_index("ix_leases_pooled_os", table_name="leases")
    op.create_index(
        "ix_leases_active_pooled_os",
        "leases",
        ["pooled", "os"],
        sqlite_where=sa.text(ACTIVE_SQL),
        postgresql_where=sa.text(ACTIVE_SQL),
    )


def downgrade() -> None:
    op.drop_index("ix_leases_active_pooled_os", table_name="leases")
    op.create_index("ix_leases_pooled_os", "leases", ["pooled", "os"])
