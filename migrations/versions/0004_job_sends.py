"""Jobs count the messages sent since they last changed state, so that a queued job's message is sent again
with a growing interval (core.db.jobs.due_for_delivery)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sends', sa.Integer(), server_default='0', nullable=False))
    # a re-queued job has no owner: rows an earlier version re-queued still name their last worker
    op.execute("UPDATE jobs SET worker = NULL, heartbeat_at = NULL WHERE status = 'queued'")
    # and a queued job with a cancel asked is cancelled (an earlier version could leave one, resent forever)
    op.execute(
        "UPDATE jobs SET status = 'cancelled', phase = 'cancelled before it started', finished_at = CURRENT_TIMESTAMP "
        "WHERE status = 'queued' AND cancel_requested"
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('sends')
