"""leases: an index of the active leases by their name's root

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

Every reservation looks for the other callers' leases whose names could clash with its
own (``engine/names.py``). It looked for those under its username's first letter, which
no index finds: every active lease a request made was read at each getservers, in the
transaction that holds every host's lock (a third of a millisecond with three hundred
leases; more, the more leases a lab holds). Two names can only clash under one root, the
name without its trailing digits (``model.name_root``), and this index finds the leases
under a root directly, on SQLite and PostgreSQL alike.
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

ACTIVE_SQL = "state IN ('creating', 'ready', 'releasing')"


def upgrade() -> None:
    op.create_index(
        "ix_leases_active_root",
        "leases",
        [sa.text("rtrim(name, '0123456789')")],
        sqlite_where=sa.text(ACTIVE_SQL),
        postgresql_where=sa.text(ACTIVE_SQL),
    )


def downgrade() -> None:
    op.drop_index("ix_leases_active_root", table_name="leases")
