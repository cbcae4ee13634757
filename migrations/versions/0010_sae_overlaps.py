"""sae overlaps: how many of one SAE's features another SAE at the same hook site has too

Revision ID: 0010
Revises: 0009
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'sae_overlaps',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('sae_id', sa.Integer(), nullable=False),
        sa.Column('other_id', sa.Integer(), nullable=False),
        sa.Column('versions', sa.JSON(), nullable=False),
        sa.Column('summary', sa.JSON(), nullable=False),
        sa.Column('best', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['other_id'], ['saes.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('sae_id', 'other_id', name='uq_sae_overlaps_pair'),
    )
    op.create_index('ix_sae_overlaps_sae_id', 'sae_overlaps', ['sae_id'])
    op.create_index('ix_sae_overlaps_other_id', 'sae_overlaps', ['other_id'])


def downgrade() -> None:
    op.drop_index('ix_sae_overlaps_other_id', table_name='sae_overlaps')
    op.drop_index('ix_sae_overlaps_sae_id', table_name='sae_overlaps')
    op.drop_table('sae_overlaps')
