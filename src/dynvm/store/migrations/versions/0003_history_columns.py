"""history: the fields queries filter and aggregate on, as indexed columns

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("history") as batch:
        batch.add_column(sa.Column("username", sa.String(64)))
        batch.add_column(sa.Column("os", sa.String(64)))
        batch.add_column(sa.Column("state", sa.String(16)))
        batch.add_column(sa.Column("created_time", sa.BigInteger))
        batch.add_column(sa.Column("create_duration_secs", sa.Float))
        batch.add_column(sa.Column("live_duration_secs", sa.Float))
        batch.create_index("ix_history_username", ["username"])
        batch.create_index("ix_history_os", ["os"])
        batch.create_index("ix_history_created_time", ["created_time"])


def downgrade() -> None:
    with op.batch_alter_table("history") as batch:
        batch.drop_index("ix_history_created_time")
        batch.drop_index("ix_history_os")
        batch.drop_index("ix_history_username")
        for column in ("live_duration_secs", "create_duration_secs", "created_time", "state", "os", "username"):
            batch.drop_column(column)
