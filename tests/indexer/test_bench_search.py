"""`cbir bench search`: the table's rows and what is invariant in them (bytes per slice, the
codebook kind's top 10 equal to flat's, a flat index that does not fit said so). Timings are
machine-dependent and only checked for being there."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from indexer.bench_search import SLICES_PER_PATIENT, synthetic_codes
from indexer.build import DEFAULT_CHECKPOINT
from service.cli import app

runner = CliRunner()
needs_checkpoint = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(),
                                      reason="no shipped checkpoint in this checkout")


def test_synthetic_codes_are_deterministic_and_structured():
    normal, abnormal, lesion = synthetic_codes(0, 3 * SLICES_PER_PATIENT, 512, 7, seed=0)
    again = synthetic_codes(SLICES_PER_PATIENT, SLICES_PER_PATIENT, 512, 7, seed=0)
    np.testing.assert_array_equal(again[0], normal[SLICES_PER_PATIENT:2 * SLICES_PER_PATIENT])
    assert normal.max() < 512 and abnormal.max() < 512
    assert (abnormal[~lesion] == 7).all(), "no lesion: the null code everywhere"
    assert (abnormal[lesion] != 7).any(axis=1).all(), "a lesion slice has lesion positions"
    # slices of one patient share most of the patient's normal code, other patients' do not
    n = SLICES_PER_PATIENT
    same = (normal[:n - 1] == normal[1:n]).mean()
    other = (normal[:n] == normal[n:2 * n]).mean()
    assert same > 0.5 and other < 0.05, (same, other)


@needs_checkpoint
def test_bench_search_prints_both_kinds_side_by_side():
    result = runner.invoke(app, ["bench", "search", "--size", "1500", "--queries", "5",
                                 "--batch", "2", "--seconds", "0"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| 1,500 ")]
    assert len(rows) == 6, result.output
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        space, kind = cells[1], cells[2]
        per_slice = {("flat", "concat"): "32,776", ("codebook", "concat"): "normal + abnormal"
                     }.get((kind, space), "16,392" if kind == "flat" else "80")
        assert cells[4] == per_slice, row
        assert re.fullmatch(r"\d+", cells[6]), row  # the peak memory a query adds
        assert all(re.fullmatch(r"\d+\.\d\d / \d+\.\d\d", c) for c in cells[7:10]), row
        assert cells[12] == ("5 of 5" if kind == "codebook" else ""), row
    assert ("codebook kind at 1,500 slices: " in result.output and " MiB resident for normal, "
            "abnormal, concat (concat reads the normal and abnormal indices)" in result.output)


@needs_checkpoint
def test_bench_search_says_what_did_not_fit():
    result = runner.invoke(app, ["bench", "search", "--size", "1500", "--space", "normal",
                                 "--queries", "5", "--batch", "2", "--seconds", "0",
                                 "--memory-gb", "0.01"])
    assert result.exit_code == 0, result.output
    assert re.search(r"\| 1,500 \| normal \| flat \| not run: needs about 0\.\d GiB, 0\.0 GiB "
                     r"allowed \|", result.output), result.output
    assert "| 1,500 | normal | codebook | " in result.output


def test_bench_search_refuses_bad_options():
    result = runner.invoke(app, ["bench", "search", "--kind", "ivf"])
    assert result.exit_code == 2 and "unknown space or kind: ivf" in result.output
    result = runner.invoke(app, ["bench", "search", "--size", "10"])
    assert result.exit_code == 2 and "--size must be at least 150" in result.output
