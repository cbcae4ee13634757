"""token maps: where in a top example a feature fired

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('feature_examples') as batch_op:
        batch_op.add_column(sa.Column('token_map', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('feature_examples') as batch_op:
        batch_op.drop_column('token_map')
