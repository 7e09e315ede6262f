"""A microscopist's review: the cells kept for review, the reviews and their verdicts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_cells",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("counted", sa.Boolean(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("field", sa.Text(), nullable=False),
        sa.Column("x", sa.Float(), nullable=False),
        sa.Column("y", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=True),
        sa.Column("stage_probability", sa.Float(), nullable=True),
        sa.Column("image", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name="fk_review_cells_sample_id_samples",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_review_cells"),
    )
    op.create_index("ix_review_cells_sample_id", "review_cells", ["sample_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("n_confirmed", sa.Integer(), nullable=False),
        sa.Column("n_rejected", sa.Integer(), nullable=False),
        sa.Column("n_added", sa.Integer(), nullable=False),
        sa.Column("n_cells", sa.Integer(), nullable=False),
        sa.Column("n_parasitized", sa.Integer(), nullable=False),
        sa.Column("parasitemia", sa.Float(), nullable=True),
        sa.Column("parasitemia_low", sa.Float(), nullable=True),
        sa.Column("parasitemia_high", sa.Float(), nullable=True),
        sa.Column("call", sa.String(length=16), nullable=False),
        sa.Column("call_given", sa.Boolean(), nullable=False),
        sa.CheckConstraint("call IN ('positive', 'negative', 'review')", name="ck_reviews_call"),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name="fk_reviews_sample_id_samples",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
    )
    op.create_index("ix_reviews_sample_id", "reviews", ["sample_id"])
    op.create_index("ix_reviews_reviewed_at", "reviews", ["reviewed_at"])
    op.create_table(
        "review_verdicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("review_id", sa.Integer(), nullable=False),
        sa.Column("cell_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.CheckConstraint("verdict IN ('confirm', 'reject')", name="ck_review_verdicts_verdict"),
        sa.ForeignKeyConstraint(["review_id"], ["reviews.id"], name="fk_review_verdicts_review_id_reviews",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["cell_id"], ["review_cells.id"], name="fk_review_verdicts_cell_id_review_cells",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_review_verdicts"),
        sa.UniqueConstraint("review_id", "cell_id", name="uq_review_verdicts_review_id_cell_id"),
    )
    op.create_index("ix_review_verdicts_review_id", "review_verdicts", ["review_id"])


def downgrade() -> None:
    op.drop_table("review_verdicts")
    op.drop_table("reviews")
    op.drop_table("review_cells")
