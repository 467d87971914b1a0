"""leases, reservations, host locks and history

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE_SQL = "state IN ('creating', 'ready', 'releasing')"


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("request_id", sa.String(36), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("os", sa.String(64), nullable=False),
        sa.Column("host_ref", sa.String(16), nullable=False),
        sa.Column("template", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("memory", sa.BigInteger, nullable=False),
        sa.Column("disk", sa.BigInteger, nullable=False),
        sa.Column("vm_uuid", sa.String(36)),
        sa.Column("vm_ref", sa.String(80)),
        sa.Column("ip", sa.String(64)),
        sa.Column("os_version", sa.String(255)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("ready_at", sa.Float),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("released_at", sa.Float),
        sa.Column("create_seconds", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("owner", sa.String(64), nullable=False),
    )
    op.create_index(
        "uq_leases_active_name",
        "leases",
        ["name"],
        unique=True,
        sqlite_where=sa.text(ACTIVE_SQL),
        postgresql_where=sa.text(ACTIVE_SQL),
    )
    op.create_index("ix_leases_state_expires", "leases", ["state", "expires_at"])
    op.create_table(
        "reservations",
        sa.Column("lease_id", sa.String(36), sa.ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("host_ref", sa.String(16), nullable=False, index=True),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("memory", sa.BigInteger, nullable=False),
        sa.Column("disk", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table("host_locks", sa.Column("ref", sa.String(16), primary_key=True))
    op.create_table(
        "history",
        sa.Column("vm_uuid", sa.String(36), primary_key=True),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("exported", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("history")
    op.drop_table("host_locks")
    op.drop_table("reservations")
    op.drop_index("ix_leases_state_expires", "leases")
    op.drop_index("uq_leases_active_name", "leases")
    op.drop_table("leases")
