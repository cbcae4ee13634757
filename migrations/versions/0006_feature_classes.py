"""feature classes: the dataset classes a feature fires on

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.add_column(sa.Column('classes', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.drop_column('classes')
