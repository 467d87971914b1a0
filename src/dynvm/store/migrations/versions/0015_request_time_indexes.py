"""requests: indexes on started_at and finished_at

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

A finished request's row stays a week, so that its status stays readable. The scheduler's
fairness reads the requests started within its window on every pass while requests wait,
and the dashboard and /api/v1/stats the requests finished in the last day; without an
index on those times each read went through every request of the week.
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

INDEXES = {"ix_requests_started_at": ["started_at"], "ix_requests_finished_at": ["finished_at"]}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "requests", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="requests")
