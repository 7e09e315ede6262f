"""Samples, their fields and their counted cells.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("screen_uid", sa.String(length=36), nullable=False),
        sa.Column("screened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("patient", sa.String(length=200), nullable=True),
        sa.Column("slide", sa.String(length=200), nullable=True),
        sa.Column("operator", sa.String(length=200), nullable=True),
        sa.Column("collected_on", sa.Date(), nullable=True),
        sa.Column("site", sa.String(length=200), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("n_fields", sa.Integer(), nullable=False),
        sa.Column("n_cells", sa.Integer(), nullable=False),
        sa.Column("n_parasitized", sa.Integer(), nullable=False),
        sa.Column("parasitemia", sa.Float(), nullable=True),
        sa.Column("parasitemia_low", sa.Float(), nullable=True),
        sa.Column("parasitemia_high", sa.Float(), nullable=True),
        sa.Column("corrected_parasitemia", sa.Float(), nullable=True),
        sa.Column("corrected_low", sa.Float(), nullable=True),
        sa.Column("corrected_high", sa.Float(), nullable=True),
        sa.Column("per_ul", sa.Float(), nullable=True),
        sa.Column("per_ul_low", sa.Float(), nullable=True),
        sa.Column("per_ul_high", sa.Float(), nullable=True),
        sa.Column("rbc_per_ul", sa.Float(), nullable=True),
        sa.Column("call", sa.String(length=16), nullable=False),
        sa.Column("reasons", JSON, nullable=False),
        sa.Column("stages", JSON, nullable=True),
        sa.Column("truth", JSON, nullable=True),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("model", JSON, nullable=False),
        sa.Column("tool_version", sa.String(length=32), nullable=False),
        sa.Column("report_path", sa.Text(), nullable=True),
        sa.CheckConstraint("call IN ('positive', 'negative', 'review')", name="ck_samples_call"),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
    )
    op.create_index("ix_samples_screen_uid", "samples", ["screen_uid"])
    op.create_index("ix_samples_screened_at", "samples", ["screened_at"])
    op.create_index("ix_samples_patient", "samples", ["patient"])
    op.create_index("ix_samples_call", "samples", ["call"])
    op.create_table(
        "fields",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("frame", sa.String(length=32), nullable=False),
        sa.Column("n_cells", sa.Integer(), nullable=False),
        sa.Column("n_parasitized", sa.Integer(), nullable=False),
        sa.Column("parasitemia", sa.Float(), nullable=True),
        sa.Column("parasitemia_low", sa.Float(), nullable=True),
        sa.Column("parasitemia_high", sa.Float(), nullable=True),
        sa.Column("cell_diameter", sa.Float(), nullable=False),
        sa.Column("quality_ok", sa.Boolean(), nullable=False),
        sa.Column("applicable", sa.Boolean(), nullable=False),
        sa.Column("flags", JSON, nullable=False),
        sa.Column("quality", JSON, nullable=False),
        sa.Column("n_excluded", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name="fk_fields_sample_id_samples",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_fields"),
    )
    op.create_index("ix_fields_sample_id", "fields", ["sample_id"])
    op.create_table(
        "cells",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("field_id", sa.Integer(), nullable=False),
        sa.Column("x", sa.Float(), nullable=False),
        sa.Column("y", sa.Float(), nullable=False),
        sa.Column("bbox_x0", sa.Integer(), nullable=False),
        sa.Column("bbox_y0", sa.Integer(), nullable=False),
        sa.Column("bbox_x1", sa.Integer(), nullable=False),
        sa.Column("bbox_y1", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=True),
        sa.Column("stage_probability", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["field_id"], ["fields.id"], name="fk_cells_field_id_fields", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_cells"),
    )
    op.create_index("ix_cells_field_id", "cells", ["field_id"])


def downgrade() -> None:
    op.drop_table("cells")
    op.drop_table("fields")
    op.drop_table("samples")
