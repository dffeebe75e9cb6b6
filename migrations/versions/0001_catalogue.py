"""The catalogue: patients, slices (one row per FAISS id) and index builds.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        sa.Column("source_path", sa.String(4096), nullable=False),
        sa.Column("cohort", sa.String(255), nullable=False),
        sa.Column("slice_count", sa.Integer(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("external_id", name="uq_patients_external_id"),
    )
    op.create_table(
        "slices",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("patient_id", sa.Integer(),
                  sa.ForeignKey("patients.id", ondelete="CASCADE", name="fk_slices_patient"),
                  nullable=False),
        sa.Column("slice_index", sa.Integer(), nullable=False),
        sa.Column("has_abnormality", sa.Boolean(), nullable=True),
        sa.Column("area_tc", sa.Integer(), nullable=True),
        sa.Column("area_ed", sa.Integer(), nullable=True),
        sa.Column("area_et", sa.Integer(), nullable=True),
        sa.Column("brain_area", sa.Integer(), nullable=False),
        sa.Column("normal_codes", sa.LargeBinary(), nullable=False),
        sa.Column("abnormal_codes", sa.LargeBinary(), nullable=False),
        sa.UniqueConstraint("patient_id", "slice_index", name="uq_slices_patient_slice"),
    )
    op.create_index("ix_slices_patient_id", "slices", ["patient_id"])
    op.create_table(
        "index_builds",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("preset", sa.String(32), nullable=False),
        sa.Column("layout_version", sa.Integer(), nullable=False),
        sa.Column("preprocessing_version", sa.Integer(), nullable=False),
        sa.Column("patients", sa.Integer(), nullable=False),
        sa.Column("slices", sa.Integer(), nullable=False),
        sa.Column("next_patient_id", sa.Integer(), nullable=False),
        sa.Column("next_slice_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.UniqueConstraint("generation", name="uq_index_builds_generation"),
    )


def downgrade() -> None:
    op.drop_table("index_builds")
    op.drop_index("ix_slices_patient_id", table_name="slices")
    op.drop_table("slices")
    op.drop_table("patients")
