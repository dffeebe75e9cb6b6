"""``cbir index build|add --ray``: a local Ray with 2 CPUs writes the index the one-process build
writes (codes, catalogue, FAISS files, thumbnails, reference distances, search results), also when
an encoding actor dies in the middle of the build.

One Ray for the module (starting one costs seconds); the cohort is three "mini" patients
(tests/indexer/test_build.py) and an unreadable one, so that skipping is covered too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer import store
from indexer.build import Indexer
from indexer.distributed import FAULT_ENV, INSTALL_HINT, RayOptions
from indexer.layout import SPACES
from tests.indexer.test_build import invoke, make_mini_patient, snapshot

PIDS = ["RAY_0000", "RAY_0001", "RAY_0002"]


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray with 2 CPUs for this module. Without Ray the tests skip, unless
    CBIR_REQUIRE_RAY=1 (CI), where they fail."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CBIR_REQUIRE_RAY") == "1":
            pytest.fail(f"Ray required but not installed: {INSTALL_HINT}")
        pytest.skip(f"needs Ray: {INSTALL_HINT}")
    # The workers inherit this environment: the fault test arms the hook by creating the file.
    trigger = tmp_path_factory.mktemp("ray-fault") / "die-once"
    os.environ[FAULT_ENV] = str(trigger)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield trigger
    finally:
        ray.shutdown()
        del os.environ[FAULT_ENV]


@pytest.fixture(scope="module")
def ray_cohort(synth_cohort, tmp_path_factory) -> Path:
    """Three mini patients and one whose T1-Gd is not a NIfTI file, in one folder."""
    root = tmp_path_factory.mktemp("ray-cohort")
    for pid, src in zip(PIDS, sorted(p for p in synth_cohort.iterdir() if p.is_dir()),
                        strict=False):
        make_mini_patient(src, root, pid)
    bad = make_mini_patient(sorted(synth_cohort.iterdir())[0], root, "RAY_BAD")
    (bad / "RAY_BAD_t1ce.nii.gz").write_bytes(b"not a NIfTI file")
    return root


@pytest.fixture(scope="module")
def one_process(ray_cohort, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "index"
    Indexer(out).build([ray_cohort], tiny_checkpoint, workers=0, progress=False)
    return out


def _files(index_dir: Path, generation: int) -> dict[str, str]:
    """sha256 of the generation's FAISS files, reference distances and thumbnails."""
    paths = [store.faiss_path(index_dir, s, generation) for s in SPACES
             if store.faiss_path(index_dir, s, generation).exists()]
    paths += [store.reference_path(index_dir, generation)]
    paths += sorted((index_dir / store.SLICES_DIR).rglob("*"))
    return {str(p.relative_to(index_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in paths if p.is_file()}


def assert_same_index(ours: Path, theirs: Path) -> None:
    a, b = snapshot(ours), snapshot(theirs)
    assert a.generation == b.generation == 1
    strip = {pid: row[:-1] for pid, row in a.patients.items()}  # all but added_at
    assert strip == {pid: row[:-1] for pid, row in b.patients.items()}
    assert sorted(a.patients) == PIDS
    assert a.slices == b.slices  # ids, slice indices, areas, codes: row for row
    assert a.index_ids == b.index_ids
    assert store.read_manifest(ours) == store.read_manifest(theirs)
    assert _files(ours, 1) == _files(theirs, 1)
    for space in SPACES:  # every slice's neighbours, in order, at the same distances
        queries = np.stack([a.indices[space].reconstruct(i) for i in sorted(a.ids())])
        da, ia = a.indices[space].search(queries, 5)
        db, ib = b.indices[space].search(queries, 5)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)


def test_ray_build_equals_the_one_process_build(ray_local, ray_cohort, tiny_checkpoint,
                                                one_process, tmp_path):
    out = tmp_path / "index"
    report = Indexer(out).build([ray_cohort], tiny_checkpoint, progress=False,
                                ray=RayOptions(workers=2))
    assert report.patients_added == PIDS
    assert [p for p, _ in report.skipped] == [str(ray_cohort / "RAY_BAD")]
    assert ray_local.exists() is False  # the fault hook stayed unarmed
    assert_same_index(out, one_process)


def test_a_killed_encoding_actor_is_restarted_and_the_index_is_complete(
        ray_local, ray_cohort, tiny_checkpoint, one_process, tmp_path):
    ray_local.touch()  # arms the hook: the first actor to see it dies mid-batch
    out = tmp_path / "index"
    report = Indexer(out).build([ray_cohort], tiny_checkpoint, progress=False,
                                ray=RayOptions(workers=1))
    assert not ray_local.exists(), "no encoding actor died: the test tested nothing"
    assert report.patients_added == PIDS
    assert_same_index(out, one_process)


def test_cli_add_with_ray_extends_an_index_as_the_one_process_add_does(
        ray_local, ray_cohort, tiny_checkpoint, tmp_path):
    """`cbir index add --ray` after a one-process build of the first patient: the same
    generation 2 as a one-process add."""
    first, rest = tmp_path / "first", tmp_path / "rest"
    shutil.copytree(ray_cohort / PIDS[0], first / PIDS[0])
    for pid in PIDS[1:]:
        shutil.copytree(ray_cohort / pid, rest / pid)
    for name, extra in (("plain", ["--workers", "0"]), ("ray", ["--ray", "--ray-workers", "1"])):
        index = tmp_path / name
        result = invoke("index", "build", "--data", first, "--out", index, "--checkpoint",
                        tiny_checkpoint, "--workers", "0")
        assert result.exit_code == 0, result.output
        result = invoke("index", "add", "--index", index, "--data", rest, *extra)
        assert result.exit_code == 0, result.output
    a, b = snapshot(tmp_path / "ray"), snapshot(tmp_path / "plain")
    assert a.generation == b.generation == 2
    assert a.slices == b.slices and a.index_ids == b.index_ids
    assert _files(tmp_path / "ray", 2) == _files(tmp_path / "plain", 2)


def test_cli_ray_workers_without_ray_is_refused(ray_cohort, tiny_checkpoint, tmp_path):
    result = invoke("index", "build", "--data", ray_cohort, "--out", tmp_path / "index",
                    "--checkpoint", tiny_checkpoint, "--ray-workers", "2")
    assert result.exit_code == 2 and "--ray-workers goes with --ray" in result.output
    assert not (tmp_path / "index").exists()
