"""precompute: images, features, examples, labels

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset', sa.String(length=32), nullable=False),
    sa.Column('split', sa.String(length=16), nullable=False),
    sa.Column('dataset_key', sa.String(length=32), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('label', sa.Integer(), nullable=False),
    sa.Column('class_name', sa.String(length=128), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('thumbnail', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dataset_key', 'index', name='uq_images_dataset_index')
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_content_hash'), ['content_hash'], unique=False)

    op.create_table('features',
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('n_active', sa.Integer(), nullable=False),
    sa.Column('frequency', sa.Float(), nullable=False),
    sa.Column('mean_active', sa.Float(), nullable=False),
    sa.Column('max_activation', sa.Float(), nullable=False),
    sa.Column('is_dead', sa.Boolean(), nullable=False),
    sa.Column('is_dense', sa.Boolean(), nullable=False),
    sa.Column('histogram', sa.JSON(), nullable=False),
    sa.Column('intervals', sa.JSON(), nullable=False),
    sa.Column('neighbours', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('sae_id', 'idx')
    )
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.create_index('ix_features_sae_flags', ['sae_id', 'is_dead', 'is_dense'], unique=False)
        batch_op.create_index('ix_features_sae_frequency', ['sae_id', 'frequency', 'idx'], unique=False)
        batch_op.create_index('ix_features_sae_max', ['sae_id', 'max_activation', 'idx'], unique=False)

    op.create_table('label_revisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('feature', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('category', sa.String(length=16), nullable=False),
    sa.Column('author', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sae_id', 'feature', 'revision', name='uq_label_revisions_revision')
    )
    with op.batch_alter_table('label_revisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_label_revisions_sae_id'), ['sae_id'], unique=False)

    op.create_table('labels',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('feature', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('category', sa.String(length=16), nullable=False),
    sa.Column('author', sa.String(length=128), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sae_id', 'feature', name='uq_labels_feature')
    )
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.create_index('ix_labels_sae_category', ['sae_id', 'category'], unique=False)
        batch_op.create_index('ix_labels_sae_text', ['sae_id', 'text'], unique=False)

    op.create_table('feature_examples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('feature', sa.Integer(), nullable=False),
    sa.Column('bucket', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('activation', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ),
    sa.ForeignKeyConstraint(['sae_id', 'feature'], ['features.sae_id', 'features.idx'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sae_id', 'feature', 'bucket', 'rank', name='uq_feature_examples_slot')
    )
    with op.batch_alter_table('feature_examples', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_feature_examples_image_id'), ['image_id'], unique=False)

    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('precompute', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.drop_column('precompute')

    with op.batch_alter_table('feature_examples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feature_examples_image_id'))

    op.drop_table('feature_examples')
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.drop_index('ix_labels_sae_text')
        batch_op.drop_index('ix_labels_sae_category')

    op.drop_table('labels')
    with op.batch_alter_table('label_revisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_label_revisions_sae_id'))

    op.drop_table('label_revisions')
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.drop_index('ix_features_sae_max')
        batch_op.drop_index('ix_features_sae_frequency')
        batch_op.drop_index('ix_features_sae_flags')

    op.drop_table('features')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_content_hash'))

    op.drop_table('images')
