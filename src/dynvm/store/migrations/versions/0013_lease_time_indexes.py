"""leases: indexes on the times the engine reads ranges of (ready_at, state + released_at, pooled_at)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07

The queue's forecast reads the leases made and ended since its last look, and the pools'
view counts what was handed out and recycled in the last day. Without an index on those
times each read scanned every lease the database ever held: a cost that grew with the
history, on every scheduler pass, for as long as dynvm ran. The ended leases are read by
state and time together: with an index on the time alone the planner still took the
state's index, which holds every lease that ever ended.
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_leases_ready_at": ["ready_at"],
    "ix_leases_state_released": ["state", "released_at"],
    "ix_leases_pooled_at": ["pooled_at"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "leases", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="leases")
