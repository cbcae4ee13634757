"""feature top class: the leading class of each feature, to filter and sort the list by

Revision ID: 0007
Revises: 0006
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.add_column(sa.Column('top_class', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('top_class_share', sa.Float(), nullable=True))
        batch_op.create_index('ix_features_sae_class_share', ['sae_id', 'top_class_share', 'idx'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.drop_index('ix_features_sae_class_share')
        batch_op.drop_column('top_class_share')
        batch_op.drop_column('top_class')
