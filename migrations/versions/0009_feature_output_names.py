"""feature output names: the concepts a feature's atom writes toward through the direct path to CLIP's image embedding

Revision ID: 0009
Revises: 0008
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.add_column(sa.Column('output_names', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.drop_column('output_names')
