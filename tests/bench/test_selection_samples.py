"""`python -m bench.selection_samples`: the run's held-out slices, split into disjoint samples
that cover them, each scored as `cbir train` scores its evaluations."""

from __future__ import annotations

import re

import pytest

from bench.selection_samples import held_out_slices, main, samples_of
from model.train import split_patients


def test_samples_are_disjoint_and_cover_every_slice():
    indices = list(range(3, 14))
    samples = samples_of(indices, 4)
    assert len(samples) == 4
    assert sorted(i for s in samples for i in s) == indices
    assert all(set(a).isdisjoint(b) for n, a in enumerate(samples) for b in samples[n + 1:])


def test_scores_the_runs_held_out_slices(synth_cohort, tiny_checkpoint, capsys):
    # the tiny checkpoint records no recipe: the split of `cbir train`'s defaults
    dataset, indices = held_out_slices(synth_cohort, {})
    pids = sorted(p.name for p in synth_cohort.iterdir() if p.is_dir())
    assert {p.pid for p in dataset.patients} == split_patients(pids, 0.1, 0)
    assert len(indices) == len(dataset) > 0  # only the held-out patients are loaded

    main([str(synth_cohort), str(tiny_checkpoint), "--samples", "1"])
    out = capsys.readouterr().out
    assert f"{len(indices)} held-out slices; 1 samples" in out, out
    found = re.search(rf"{re.escape(str(tiny_checkpoint))}: all (-?\d+\.\d{{3}}); samples "
                      r"(-?\d+\.\d{3})$", out, re.M)
    assert found, out
    assert found.group(1) == found.group(2)  # one sample is every slice
    with pytest.raises(SystemExit):
        main([str(synth_cohort), str(tiny_checkpoint), "--samples", "0"])
