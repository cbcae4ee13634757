"""initial schema: SAEs and training curves

Revision ID: 0001
Revises: 
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('saes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('pretrained', sa.String(length=128), nullable=False),
    sa.Column('random_weights', sa.Boolean(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.String(length=16), nullable=False),
    sa.Column('d_in', sa.Integer(), nullable=False),
    sa.Column('d_sae', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('recipe', sa.String(length=16), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('provenance', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_saes_status'), ['status'], unique=False)

    op.create_table('training_points',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('samples', sa.BigInteger(), nullable=False),
    sa.Column('loss', sa.Float(), nullable=False),
    sa.Column('mse', sa.Float(), nullable=False),
    sa.Column('train_evr', sa.Float(), nullable=False),
    sa.Column('l0', sa.Float(), nullable=False),
    sa.Column('dead_fraction', sa.Float(), nullable=False),
    sa.Column('lr', sa.Float(), nullable=False),
    sa.Column('heldout_evr', sa.Float(), nullable=True),
    sa.Column('extra', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sae_id', 'step', name='uq_training_points_sae_step')
    )
    with op.batch_alter_table('training_points', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_points_sae_id'), ['sae_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('training_points', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_points_sae_id'))

    op.drop_table('training_points')
    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_saes_status'))

    op.drop_table('saes')
