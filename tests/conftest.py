"""Shared fixtures: one small synthetic cohort per test session (real files, real template)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data.synth.cohort import synthesize

COHORT_SEED = 1
COHORT_PATIENTS = 4


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """``cbir synth --out DIR --patients 4 --seed 1`` written once; treat it as read-only."""
    out = tmp_path_factory.mktemp("cohort")
    synthesize(out, patients=COHORT_PATIENTS, seed=COHORT_SEED, workers=2, progress=False)
    return out
