"""An evaluation on the session's synthetic cohort: two patients indexed as references with the
tiny checkpoint, the other two as queries (folders linked, not copied)."""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.build import Indexer
from service.evaluation.protocol import evaluate

KS = [1, 3]
MAX_QUERIES = 12


@pytest.fixture(scope="session")
def split_cohort(synth_cohort, tmp_path_factory) -> tuple[Path, Path]:
    """(references, queries): SYN3_0000 and _0001, then SYN3_0002 and _0003."""
    root = tmp_path_factory.mktemp("eval-cohorts")
    patients = sorted(p for p in synth_cohort.iterdir()
                      if p.is_dir() and not p.name.startswith("."))
    assert len(patients) == 4
    refs, queries = root / "references", root / "queries"
    for i, folder in enumerate(patients):
        dest = refs if i < 2 else queries
        dest.mkdir(exist_ok=True)
        (dest / folder.name).symlink_to(folder, target_is_directory=True)
    return refs, queries


@pytest.fixture(scope="session")
def eval_index(split_cohort, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-index") / "index"
    Indexer(out).build([split_cohort[0]], checkpoint=tiny_checkpoint, progress=False, workers=0)
    return out


@pytest.fixture(scope="session")
def evaluation(eval_index, split_cohort):
    return evaluate(eval_index, [split_cohort[1]], ks=KS, max_queries=MAX_QUERIES, seed=0,
                    draws=200, command="pytest", progress=False)


@pytest.fixture(scope="session")
def report_dir(evaluation, tmp_path_factory) -> Path:
    from service.evaluation.report import write_report

    out = tmp_path_factory.mktemp("eval-report")
    write_report(evaluation, out)
    return out
