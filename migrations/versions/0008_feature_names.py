"""feature names: automatic names from CLIP's image-text space and the coherence of the top images

Revision ID: 0008
Revises: 0007
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.add_column(sa.Column('auto_name', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('auto_score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('auto_names', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('coherence', sa.Float(), nullable=True))
        batch_op.create_index('ix_features_sae_coherence', ['sae_id', 'coherence', 'idx'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('features') as batch_op:
        batch_op.drop_index('ix_features_sae_coherence')
        batch_op.drop_column('coherence')
        batch_op.drop_column('auto_names')
        batch_op.drop_column('auto_score')
        batch_op.drop_column('auto_name')
