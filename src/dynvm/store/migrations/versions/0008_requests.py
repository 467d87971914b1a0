"""requests: every lease request, durable from acceptance to its end

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

A request is a row from the moment it is accepted: ``queued`` (waiting for room, with a
deadline), ``creating`` (its leases reserved, its VMs being made), then ``ready``,
``failed``, ``cancelled`` or ``timed out``. Its per-VM progress is kept beside it, so any
replica answers ``GET /api/v1/requests/{id}`` the same, before and after a restart. The
scheduler writes each waiting request's position and ETA on every pass.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("caller", sa.String(64), nullable=True),
        sa.Column("os", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("cpus", sa.Integer, nullable=True),
        sa.Column("memory", sa.BigInteger, nullable=True),
        sa.Column("expires_in_minutes", sa.Float, nullable=True),
        sa.Column("host_ref", sa.String(16), nullable=True),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("origin", sa.String(16), nullable=False, server_default="v1"),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("builder", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("wait_until", sa.Float, nullable=True),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("error_status", sa.Integer, nullable=True),
        sa.Column("error_kind", sa.String(32), nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("position", sa.Integer, nullable=True),
        sa.Column("eta_at", sa.Float, nullable=True),
        sa.Column("eta_first", sa.Float, nullable=True),
        sa.Column("vms", sa.JSON, nullable=False),
    )
    op.create_index("ix_requests_state_created", "requests", ["state", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_requests_state_created", table_name="requests")
    op.drop_table("requests")
