"""index.json must name the checkpoint so that any later process finds it, wherever it runs."""

from __future__ import annotations

import shutil

from indexer.build import Indexer
from indexer.verify import verify


def test_relative_checkpoint_path_still_found_from_elsewhere(tiny_checkpoint, synth_cohort,
                                                             tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "cohort").mkdir(parents=True)
    one = sorted(p for p in synth_cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(one, work / "cohort" / one.name)
    shutil.copy(tiny_checkpoint, work / "tiny.pt")
    monkeypatch.chdir(work)
    Indexer("index").build(["cohort"], "tiny.pt", workers=0, progress=False)
    assert verify("index") == []  # same directory: found

    monkeypatch.chdir(tmp_path)
    assert verify(work / "index") == []
