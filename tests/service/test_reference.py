"""indexer.reference: the between-patient nearest-neighbour distances a hit is read against."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from indexer import reference, store
from indexer.layout import SPACES
from indexer.reference import Reference
from service.retrieval import Codes, Retrieval, Timings


def test_table_distances_equal_a_faiss_search(retrieval):
    """The code-table sum is the exact squared L2 of the stored vectors: each sampled slice's
    nearest slice of another patient, found by FAISS, is at the measured distance."""
    ref = Reference.measure(retrieval.codebooks, retrieval.codes, retrieval.slice_patient)
    n = len(retrieval.slice_ids)
    rows = np.unique(np.linspace(0, n - 1, ref.sampled).round().astype(np.int64))
    for space in SPACES:
        found = []
        for row in rows[:: max(1, len(rows) // 12)]:
            codes = Codes(retrieval.codes[row, 0].astype(np.int64),
                          retrieval.codes[row, 1].astype(np.int64))
            hit = retrieval.search(space, codes, 1, Timings(),
                                   exclude_patient_ids=(int(retrieval.slice_patient[row]),))[0]
            found.append(hit.distance)
        for d in found:  # every FAISS nearest distance is one of the measured ones
            assert np.min(np.abs(ref.distances[space] - d)) <= 1e-4 * max(1.0, d), space


def test_measured_in_column_blocks_as_in_one(retrieval, monkeypatch):
    """The index is read in blocks of ``COLUMNS`` slices (the memory stays bounded at any
    size): block boundaries, inside a patient too, change no distance."""
    whole = Reference.measure(retrieval.codebooks, retrieval.codes, retrieval.slice_patient)
    monkeypatch.setattr(reference, "COLUMNS", 7)
    assert len(retrieval.codes) > 3 * 7
    blocks = Reference.measure(retrieval.codebooks, retrieval.codes, retrieval.slice_patient)
    assert blocks.sampled == whole.sampled
    for space in SPACES:
        np.testing.assert_array_equal(blocks.distances[space], whole.distances[space])


def test_percentiles_and_what_is_far():
    ref = Reference(distances={s: np.array([1.0, 2.0, 3.0, 4.0]) for s in SPACES}, sampled=4)
    assert ref.median("normal") == 2.5
    assert [ref.match_percentile("normal", d) for d in (0.0, 2.0, 3.5, 9.0)] == [
        100.0, 75.0, 25.0, 0.0]
    assert ref.far("normal", 4.0) is None  # as far as the farthest sampled best match
    assert ref.far("normal", 5.0) == pytest.approx(2.0)  # beyond all: 2x the median


def test_slices_sharing_a_code_are_at_distance_zero():
    """Equal codes are exactly 0 apart, not the expanded form's rounding: a group whose slices
    mostly share one code has median 0, and the balanced compose weight stays finite."""
    book = np.random.default_rng(0).normal(0, 4.0, (64, 64))
    square = (book ** 2).sum(1)
    expanded = np.diag(square[:, None] + square[None, :] - 2.0 * book @ book.T)
    shared = int(np.argmax(expanded))  # a row the expanded form puts above 0 from itself
    assert expanded[shared] > 0
    books = {"normal": np.eye(4, 64) * 30.0, "abnormal": book}
    tables = reference.codebook_tables(books)
    assert all((np.diag(t) == 0).all() for t in tables.values())
    codes = np.zeros((12, 2, 8, 8), np.uint16)
    codes[:, 1] = shared  # every slice the same non-null abnormal code
    codes[::4, 0, 0, 0] = 1  # and a few anatomies apart
    ref = Reference.measure(books, codes, np.arange(12) % 3, np.zeros(12, np.int8))
    assert ref.median("abnormal", lesion=False) == 0.0
    rounded = Reference({s: np.array([0.0, 2e-13, 3e-13, 5.0]) for s in SPACES}, 4)
    assert rounded.median("abnormal") == 0.0  # a stored reference measured with rounding
    weights = Retrieval.compose_weights(SimpleNamespace(reference=rounded), lesion=False)
    assert weights == (1.0, 1.0)


def test_one_patient_has_no_reference():
    codes = np.zeros((5, 2, 8, 8), np.uint16)
    books = {"normal": np.eye(4, 64), "abnormal": np.eye(4, 64)}
    assert Reference.measure(books, codes, np.zeros(5, np.int64)) is None


def test_the_service_reads_the_reference_stored_with_the_generation(service_index, retrieval,
                                                                     monkeypatch):
    """Loading a generation reads its stored reference rather than measuring one; an index
    written before references were stored (no file) is measured on load."""
    from service.retrieval import Retrieval

    stored = Reference.load(store.reference_path(service_index, retrieval.build.generation),
                            retrieval.codebooks)
    assert stored is not None
    for space in SPACES:
        assert np.array_equal(retrieval.reference.distances[space], stored.distances[space])

    def no_measuring(*args):
        raise AssertionError("measured although a reference is stored")

    monkeypatch.setattr(Reference, "measure", staticmethod(no_measuring))
    reopened = Retrieval.open(service_index)
    assert reopened.reference.sampled == stored.sampled


def test_an_index_without_a_stored_reference_is_measured_on_load(service_index, retrieval,
                                                                  tmp_path):
    import shutil

    from service.retrieval import Retrieval

    old = tmp_path / "index"
    shutil.copytree(service_index, old)
    for path in (old / store.FAISS_DIR).glob("reference-*"):
        path.unlink()
    measured = Retrieval.open(old).reference
    for space in SPACES:
        assert np.array_equal(measured.distances[space], retrieval.reference.distances[space])


def test_a_query_is_read_against_slices_of_its_status():
    """Lesion queries against lesion slices' best matches, lesion-free against lesion-free; a
    group under MIN_GROUP sampled slices, or a query of unknown status, against all."""
    lesion = np.arange(10, 20, dtype=float)  # lesions differ: large best-match distances
    free = np.linspace(0.0, 1.0, 10)  # lesion-free slices share the null code
    d = np.concatenate([free, lesion])
    status = np.array([0] * 10 + [1] * 10, np.int8)
    order = np.argsort(d, kind="stable")
    ref = Reference({s: d[order] for s in SPACES}, 20, {s: status[order] for s in SPACES})
    assert ref.median("abnormal", lesion=True) == pytest.approx(14.5)
    assert ref.median("abnormal", lesion=False) == pytest.approx(0.5)
    # a typical lesion match reads as one; against all slices it read as a poor one
    assert ref.match_percentile("abnormal", 14.0, lesion=True) == 60.0
    assert ref.match_percentile("abnormal", 14.0) == 30.0
    assert ref.far("abnormal", 5.0, lesion=False) == pytest.approx(10.0)
    assert ref.far("abnormal", 5.0, lesion=True) is None
    few = Reference({s: d[order] for s in SPACES}, 20,
                    {s: np.where(status[order] == 1, 1, -1).astype(np.int8) for s in SPACES})
    few.status["abnormal"][few.distances["abnormal"] > 12] = -1  # 3 lesion slices left
    assert reference.MIN_GROUP > 3
    np.testing.assert_array_equal(few.group("abnormal", True), few.distances["abnormal"])


def test_status_is_measured_and_stored(retrieval, tmp_path):
    ref = Reference.measure(retrieval.codebooks, retrieval.codes, retrieval.slice_patient,
                            retrieval.slice_abnormal)
    n = len(retrieval.slice_ids)
    rows = np.unique(np.linspace(0, n - 1, ref.sampled).round().astype(np.int64))
    for space in SPACES:
        assert sorted(ref.status[space].tolist()) == sorted(
            retrieval.slice_abnormal[rows].tolist())
        assert np.all(np.diff(ref.distances[space]) >= 0)
    path = tmp_path / "ref.npz"
    ref.save(path, retrieval.codebooks)
    back = Reference.load(path, retrieval.codebooks)
    for space in SPACES:
        np.testing.assert_array_equal(back.status[space], ref.status[space])
        np.testing.assert_array_equal(back.distances[space], ref.distances[space])
    assert back.example == ref.example


def _scalar_codes(values: list[float]) -> np.ndarray:
    """A (K, K) squared-distance table of codebook rows lying on one line at ``values``."""
    v = np.asarray(values, np.float64)
    return (v[:, None] - v[None, :]) ** 2


def test_the_example_is_the_lesion_slice_with_the_best_first_page(monkeypatch):
    """Among lesion slices: a page of lesion hits before a nearer page with a lesion-free hit,
    then the nearest last hit; a null-code query (its hits tie at 0) only when nothing else."""
    monkeypatch.setattr(reference, "EXAMPLE_HITS", 2)
    table = _scalar_codes([0.0, 5.0, 6.0, 7.0, 20.0])  # code 0: the null code
    # (patient, code, lesion): patients 0-2 have lesions too small for a code (patient 2's
    # page is two lesions at distance 0); patients 3-6 a lesion and a lesion-free slice each.
    slices = [(0, 0, 1), (1, 0, 1), (2, 0, 1), (2, 0, 0), (3, 1, 1), (3, 0, 0), (4, 2, 1),
              (4, 0, 0), (5, 3, 1), (5, 0, 0), (6, 4, 1), (6, 0, 0)]
    patients = np.array([p for p, _, _ in slices])
    codes = np.repeat(np.array([[c] for _, c, _ in slices]), 64, axis=1)
    abnormal = np.array([a for _, _, a in slices], np.int8)
    # patient 4's lesion (code 6): patient 3's and 5's lesions, each 1 away: the nearest page
    # of coded lesions; the null-code pages, nearer still, are passed over
    assert reference.choose_example(table, codes, patients, abnormal) == 6
    # patient 5's lesion-free slice on patient 4's lesion code: patient 4's page now holds it
    # (distance 0), and patient 3's too (1 away, nearer than patient 5's lesion at 4):
    # patient 5's own page, two lesions, wins
    codes[9] = 2
    assert reference.choose_example(table, codes, patients, abnormal) == 8
    # only null-code lesions left: one of them, rather than none
    codes[abnormal == 1] = 0
    assert abnormal[reference.choose_example(table, codes, patients, abnormal)] == 1
    assert reference.choose_example(table, codes, patients, np.zeros_like(abnormal)) == -1
    assert reference.choose_example(table, codes, np.zeros_like(patients), abnormal) == -1


def test_the_example_candidates_are_bounded(monkeypatch):
    """At most MAX_PAIRS / N lesion slices are scored, evenly spaced: a large index costs what
    a small one does, and the example is still a lesion slice."""
    rng = np.random.default_rng(0)
    n = 400
    table = _scalar_codes(list(rng.normal(0, 3, 16)))
    codes = rng.integers(1, 16, (n, 64))
    patients = np.arange(n) // 20
    abnormal = (np.arange(n) % 2).astype(np.int8)
    scored = []
    real_take = np.take

    def counting_take(a, idx, axis=None):
        if axis == 1:
            scored.append(a.shape[0])
        return real_take(a, idx, axis=axis)

    monkeypatch.setattr(reference, "MAX_PAIRS", 10 * n)
    monkeypatch.setattr(reference.np, "take", counting_take)
    row = reference.choose_example(table, codes, patients, abnormal)
    assert abnormal[row] == 1
    assert sum(scored) == 10 * 64  # 10 candidates, 64 code positions each


def test_info_names_the_example(client, retrieval):
    example = client.get("/info").json()["example"]
    assert example == retrieval.example() and example is not None
    row = list(retrieval.slice_ids).index(example["slice_id"])
    assert retrieval.slice_abnormal[row] == 1
    assert retrieval.patients[int(retrieval.slice_patient[row])][0] == example["patient_id"]
    assert int(retrieval.slice_index[row]) == example["slice_index"]
