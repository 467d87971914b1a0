"""installation.claim_seq and claim_token: the database's side of its claim on the hosts

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

The leader renews a claim on every host it manages (``engine/claim.py``): a sequence
number, a random token, who wrote it and when. The database keeps the number and token
of the last claim it made: its own history, which a copy of the database shares only up
to the moment it was copied. A process whose database never wrote the claim the hosts
carry, while the writer is still renewing it, is a copy, and touches nothing.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("installation") as batch:
        batch.add_column(sa.Column("claim_seq", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("claim_token", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("installation") as batch:
        batch.drop_column("claim_token")
        batch.drop_column("claim_seq")
