"""`cbir bench index`: prints bare encode and end-to-end indexing throughput and their ratio.

Only the format of the figures is checked; their values depend on the machine and its load.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def test_bench_index_prints_both_rates_and_their_ratio(synth_cohort, tiny_checkpoint, tmp_path):
    data = tmp_path / "cohort"
    shutil.copytree(synth_cohort / "SYN3_0000", data / "SYN3_0000")
    result = runner.invoke(app, ["bench", "index", "--data", str(data), "--checkpoint",
                                 str(tiny_checkpoint), "--batch-size", "16", "--workers", "1",
                                 "--repeats", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3, result.output
    assert re.fullmatch(r"bare encode: \d+\.\d slices/s \(tiny on (cpu|cuda\S*), batch 16, "
                        r"median of 2\)", lines[0]), lines[0]
    assert re.fullmatch(r"end-to-end indexing: \d+\.\d slices/s \([1-9]\d* slices of 1 patients "
                        r"in \d+\.\d s, 1 workers\)", lines[1]), lines[1]
    assert re.fullmatch(r"ratio \d+\.\d{3} \(goal >= 0\.90\)", lines[2]), lines[2]
    assert not list(tmp_path.glob("**/*.faiss")), "the benchmark index is temporary"


def test_bench_index_refuses_bad_options(tmp_path):
    result = runner.invoke(app, ["bench", "index", "--data", str(tmp_path), "--checkpoint",
                                 str(tmp_path / "none.pt"), "--batch-size", "0"])
    assert result.exit_code == 2
    assert "--batch-size must be at least 1" in result.output
    result = runner.invoke(app, ["bench", "index", "--data", str(tmp_path), "--checkpoint",
                                 str(tmp_path / "none.pt")])
    assert result.exit_code == 2
    assert "none.pt" in result.output


def test_encoded_patients_carry_numpy_arrays(synth_cohort, tiny_checkpoint):
    """The loader must not turn the workers' arrays into tensors: per-slice work in the main
    process on tiny tensors cost a quarter of the indexing speed under load."""
    from indexer.build import encode_cases
    from ingest.layouts import find_cases
    from model.checkpoint import load_model

    case = next(c for c in find_cases(synth_cohort).cases if c.pid == "SYN3_0000")
    model, _ = load_model(tiny_checkpoint)
    (enc,) = encode_cases(model, [case], workers=0, progress=False)
    for name in ("slice_index", "areas", "brain_area", "normal_idx", "abnormal_idx"):
        assert isinstance(getattr(enc, name), np.ndarray), (name, type(getattr(enc, name)))
    assert isinstance(enc.thumbnails, bytes) and enc.areas.shape == (len(enc.slice_index), 3)
