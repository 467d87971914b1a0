"""leases.state and requests.state: only the states dynvm knows

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

A check constraint on each: the database refuses a state that ``states.LeaseState`` or
``states.RequestState`` does not name (a typo in code, or a hand-edited row), so every
reader can trust the state it reads. The lists are written out here, as they are at this
revision: a later state is added by a later migration.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

LEASE_STATES = ("creating", "ready", "releasing", "released", "expired", "failed")
REQUEST_STATES = ("queued", "creating", "ready", "failed", "cancelled", "timed out")


def _in(states: tuple[str, ...]) -> str:
    return "state IN (" + ", ".join(f"'{state}'" for state in states) + ")"


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.create_check_constraint("ck_leases_state", sa.text(_in(LEASE_STATES)))
    with op.batch_alter_table("requests") as batch:
        batch.create_check_constraint("ck_requests_state", sa.text(_in(REQUEST_STATES)))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_constraint("ck_requests_state", type_="check")
    with op.batch_alter_table("leases") as batch:
        batch.drop_constraint("ck_leases_state", type_="check")
