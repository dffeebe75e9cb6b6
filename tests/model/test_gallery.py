"""cbir gallery: one row per lesion slice, six columns, written as a PNG."""

from __future__ import annotations

from PIL import Image

from model.gallery import COLUMNS, write_gallery


def test_gallery_draws_one_row_per_lesion_patient(tiny_checkpoint, synth_cohort, tmp_path):
    out = tmp_path / "grid.png"
    labels = write_gallery(tiny_checkpoint, synth_cohort, out, max_rows=2)
    assert len(labels) == 2 and all(":" in label for label in labels)
    width, height = Image.open(out).size
    assert width >= len(COLUMNS) * 256 and height >= 2 * 256
