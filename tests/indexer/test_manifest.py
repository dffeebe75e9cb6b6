"""index.json must name the checkpoint so that any later process finds it, wherever it runs."""

from __future__ import annotations

import shutil

from indexer.build import Indexer
from indexer.verify import verify


def test_relative_checkpoint_path_still_found_from_elsewhere(tiny_checkpoint, tmp_path,
                                                             monkeypatch):
    work = tmp_path / "work"
    (work / "empty_cohort").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, work / "tiny.pt")
    monkeypatch.chdir(work)
    Indexer("index").build(["empty_cohort"], "tiny.pt", workers=0, progress=False)
    assert verify("index") == []  # same directory: found

    monkeypatch.chdir(tmp_path)
    assert verify(work / "index") == []
