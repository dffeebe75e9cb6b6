"""Patients keep the StudyInstanceUID and SeriesInstanceUID of a DICOM-sourced case (never a
patient's name or id from the tags); null for NIfTI cohorts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch: SQLite cannot drop columns in place (the downgrade), so both go through a copy.
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("study_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("series_uid", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("patients") as batch:
        batch.drop_column("series_uid")
        batch.drop_column("study_uid")
