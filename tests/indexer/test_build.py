"""Building and maintaining an index: self-retrieval, PNG round trip, FAISS vs brute force, the
add/replace/remove life cycle on SQLite and PostgreSQL, verify, and the `cbir index` commands.

Encoding dominates the cost (about 50 ms per slice for the tiny preset on a CPU), so the full
patients are indexed once per module (``pair_index``), and the life-cycle, verify and CLI tests
use "mini" patients: real synthetic patients cut to 10 axial planes around their lesion.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

import indexer.build as build_mod
import indexer.encoding as encoding
import indexer.verify as verify_module
from indexer import store
from indexer.build import DEFAULT_CHECKPOINT, Indexer, codebooks_of
from indexer.catalog import Patient, Slice, active_build, decode_codes, make_engine
from indexer.encoding import encode_slices
from indexer.faiss_lib import faiss
from indexer.layout import DIMS, SPACES, space_vectors
from indexer.reference import Reference
from indexer.store import IndexStoreError
from indexer.verify import stats, verify
from ingest.layouts import find_cases
from ingest.volumes import load_case
from model.checkpoint import load_model, save_checkpoint
from model.data.dataset import case_slices
from model.data.preprocess import image_to_slice, slice_to_png
from service.cli import app

CPU = torch.device("cpu")
MINI_SLICES = 10
A, B, C, D = "MINI_0000", "MINI_0001", "MINI_0002", "MINI_0003"
runner = CliRunner()


# -- helpers -----------------------------------------------------------------------------------


def make_mini_patient(src: Path, root: Path, pid: str, n: int = MINI_SLICES) -> Path:
    """``src`` cut to ``n`` axial planes around its lesion (or its middle), renamed ``pid``."""
    seg_path = src / f"{src.name}_seg.nii.gz"
    ref = nib.load(seg_path if seg_path.is_file() else src / f"{src.name}_t1ce.nii.gz")
    z = np.flatnonzero(np.asanyarray(ref.dataobj).any(axis=(0, 1)))
    zc = int(z.mean()) if seg_path.is_file() and z.size else ref.shape[2] // 2
    out = root / pid
    out.mkdir(parents=True)
    for f in sorted(src.glob("*.nii.gz")):
        kind = f.name[len(src.name) + 1:]
        nib.save(nib.load(f).slicer[:, :, zc - n // 2:zc + n - n // 2], out / f"{pid}_{kind}")
    return out


@dataclass
class Snapshot:
    """The active state of an index: catalogue rows and the ids in each FAISS index."""

    generation: int
    patients: dict[str, tuple]  # external id -> (id, source_path, cohort, slice_count, added_at)
    slices: dict[str, list[tuple]]  # external id -> rows ordered by id (codes last)
    index_ids: dict[str, set[int]]
    indices: dict[str, faiss.Index]

    def ids(self, *pids: str) -> set[int]:
        return {r[0] for pid in (pids or self.slices) for r in self.slices[pid]}

    def vectors(self, books, *pids: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rows = [r for pid in (pids or self.slices) for r in self.slices[pid]]
        normal = np.stack([decode_codes(r[-2]) for r in rows])
        abnormal = np.stack([decode_codes(r[-1]) for r in rows])
        return np.array([r[0] for r in rows], np.int64), space_vectors(books, normal, abnormal)


def snapshot(index_dir: Path, url: str | None = None) -> Snapshot:
    engine = make_engine(url or store.default_db_url(index_dir))
    try:
        with Session(engine) as session:
            current = active_build(session)
            assert current is not None, "no active build"
            patients = {p.external_id: (p.id, p.source_path, p.cohort, p.slice_count, p.added_at)
                        for p in session.scalars(select(Patient))}
            pid_of = {v[0]: k for k, v in patients.items()}
            slices: dict[str, list[tuple]] = {k: [] for k in patients}
            for r in session.scalars(select(Slice).order_by(Slice.id)):
                slices[pid_of[r.patient_id]].append(
                    (r.id, r.slice_index, r.has_abnormality, r.area_tc, r.area_ed, r.area_et,
                     r.brain_area, r.normal_codes, r.abnormal_codes))
            generation = current.generation
    finally:
        engine.dispose()
    indices = store.read_generation(index_dir, generation)
    return Snapshot(generation, patients, slices,
                    {s: set(store.index_ids(indices[s]).tolist()) for s in SPACES}, indices)


def assert_consistent(index_dir: Path, snap: Snapshot) -> None:
    """verify() finds nothing and stats() agrees with the catalogue and the index files."""
    problems = verify(index_dir)
    assert problems == [], problems
    s = stats(index_dir)
    n = sum(len(rows) for rows in snap.slices.values())
    assert (s["generation"], s["patients"], s["slices"]) == (snap.generation, len(snap.patients),
                                                             n), s
    for space in SPACES:
        assert snap.indices[space].ntotal == n, (space, snap.indices[space].ntotal, n)
        assert snap.index_ids[space] == snap.ids(), f"{space} ids differ from the catalogue"
        size = store.faiss_path(index_dir, space, snap.generation).stat().st_size
        assert s["index_bytes"][space] == size
        assert s["bytes_per_slice"][space] == DIMS[space] * 4 + 8, s["bytes_per_slice"]
        assert 0 < s["fixed_bytes"][space] == size - n * s["bytes_per_slice"][space] < 1024
    for pid, (patient_id, *_rest, count, _added) in snap.patients.items():
        assert count == len(snap.slices[pid]), pid
        assert store.thumbnail_path(index_dir, patient_id).is_file(), pid


def rewrite_index(index_dir: Path, space: str, change) -> None:
    """Edit the active generation's ``space`` index in place, as a corruption would."""
    gen = snapshot(index_dir).generation
    path = store.faiss_path(index_dir, space, gen)
    index = faiss.read_index(str(path))
    change(index)
    faiss.write_index(index, str(path))


def duplicate_groups(vectors: np.ndarray) -> np.ndarray:
    """For each row, a label shared exactly by the rows with identical bytes."""
    _, labels = np.unique(vectors, axis=0, return_inverse=True)
    return labels.reshape(-1)


def assert_first_at_zero(index: faiss.Index, query: np.ndarray, owns: set[int], same: set[int],
                         what: str) -> None:
    """One query: the first hit is at distance exactly 0, each of ``owns`` (the slices whose
    own vector or code the query is) is among the hits at distance 0, and those hits are exactly
    ``same`` (the slices with identical vectors)."""
    k = min(len(same) + 1, index.ntotal)
    dist, ids = index.search(np.ascontiguousarray(query[None]), k)
    assert dist[0, 0] == 0.0, f"{what}: first hit {ids[0, 0]} at distance {dist[0, 0]}"
    zero = set(ids[0][dist[0] == 0.0].tolist())
    for own in owns:
        assert own in zero, f"{what}: own id {own} not among the hits at distance 0 {zero}"
    assert zero == same, f"{what}: hits at distance 0 {sorted(zero)}, identical {sorted(same)}"


def invoke(*args) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"unhandled {result.exception!r}\n{result.output}")
    return result


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_books(tiny_checkpoint):
    model, ckpt = load_model(tiny_checkpoint, CPU)
    return model, codebooks_of(model), ckpt


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """A second tiny checkpoint with different weights."""
    from model.config import preset
    from model.network import DecompositionNet

    torch.manual_seed(1)
    net = DecompositionNet(preset("tiny"))
    with torch.no_grad():
        net(torch.rand(2, 1, 256, 256))
    path = tmp_path_factory.mktemp("ckpt2") / "other.pt"
    save_checkpoint(path, net.eval(), "tiny")
    return path


@pytest.fixture(scope="module")
def mini(synth_cohort, tmp_path_factory) -> dict[str, Path]:
    """MINI_0000..MINI_0003 -> a cohort folder holding only that mini patient."""
    base = tmp_path_factory.mktemp("mini")
    out = {}
    for i, src in enumerate(sorted(p for p in synth_cohort.iterdir() if p.is_dir())):
        pid = f"MINI_{i:04d}"
        make_mini_patient(src, base / pid, pid)
        out[pid] = base / pid
    return out


@dataclass
class PairIndex:
    dir: Path
    cohort: Path
    report: build_mod.IndexReport
    snap: Snapshot
    ids: np.ndarray
    vectors: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def pair_index(synth_cohort, tiny_checkpoint, model_books, tmp_path_factory) -> PairIndex:
    """Two full synthetic patients, indexed once with one DataLoader worker (SQLite)."""
    base = tmp_path_factory.mktemp("pair")
    for src in sorted(p for p in synth_cohort.iterdir() if p.is_dir())[:2]:
        shutil.copytree(src, base / "cohort" / src.name)
    report = Indexer(base / "index").build([base / "cohort"], tiny_checkpoint, workers=1,
                                           progress=False)
    snap = snapshot(base / "index")
    ids, vectors = snap.vectors(model_books[1])
    return PairIndex(base / "index", base / "cohort", report, snap, ids, vectors)


@pytest.fixture(scope="module")
def mini_index(mini, tiny_checkpoint, tmp_path_factory) -> Path:
    """MINI_0000 and MINI_0001 from two --data folders (SQLite). Copy it before changing it."""
    out = tmp_path_factory.mktemp("mini-index") / "index"
    Indexer(out).build([mini[A], mini[B]], tiny_checkpoint, workers=0, progress=False)
    return out


@pytest.fixture
def fresh(mini_index, tmp_path) -> Path:
    """A private copy of ``mini_index`` (its catalogue is SQLite inside the directory)."""
    out = tmp_path / "index"
    shutil.copytree(mini_index, out)
    return out


# -- the full build ----------------------------------------------------------------------------


def test_build_report_and_consistency(pair_index):
    report, snap = pair_index.report, pair_index.snap
    assert report.operation == "build" and report.generation == 1
    assert report.patients_added == ["SYN3_0000", "SYN3_0001"]
    assert report.skipped == [] and report.patients_removed == []
    n = sum(len(r) for r in snap.slices.values())
    assert report.slices_added == report.total_slices == n > 100
    assert report.total_patients == 2 and report.slices_per_s > 0
    assert report.index_bytes == sum(
        store.faiss_path(pair_index.dir, s, 1).stat().st_size for s in SPACES)
    for space in SPACES:
        assert DIMS[space] * 4 <= report.bytes_per_slice[space] <= DIMS[space] * 4 + 64, (
            space, report.bytes_per_slice)
        index = faiss.downcast_index(snap.indices[space])
        assert isinstance(index, faiss.IndexIDMap2), type(index)
        assert isinstance(faiss.downcast_index(index.index), faiss.IndexFlatL2)
        assert index.d == DIMS[space]
    assert_consistent(pair_index.dir, snap)


def test_catalogue_rows_match_the_cohort(pair_index):
    """Slice rows are the brain slices the shared preprocessing finds, with their label areas."""
    cases = {c.pid: c for c in find_cases(pair_index.cohort).cases}
    for pid, rows in pair_index.snap.slices.items():
        case = cases[pid]
        stacks = case_slices(load_case(case, with_healthy=False))
        assert [r[1] for r in rows] == stacks.slice_index.tolist(), pid
        patient = pair_index.snap.patients[pid]
        assert patient[1] == str(case.t1ce) and patient[3] == len(rows)
        assert patient[2] == pair_index.cohort.name
        for r, image, abn in zip(rows, stacks.image, stacks.abnormal, strict=True):
            _id, _k, has_abn, tc, ed, et, brain, *_ = r
            assert brain == int((image > 0).sum())
            assert has_abn == bool(abn.any())
            assert (tc, ed, et) == (int((abn == 1).sum()), int((abn == 2).sum()),
                                   int((abn == 3).sum()))
        thumbs = store.read_thumbnails(pair_index.dir, patient[0])
        np.testing.assert_array_equal(thumbs["slice_index"], stacks.slice_index)
        np.testing.assert_array_equal(thumbs["image"], np.rint(stacks.image * 255))
        assert thumbs["labels"].shape == thumbs["image"].shape


def test_every_slice_retrieves_itself_at_distance_zero(pair_index, capsys):
    snap, ids = pair_index.snap, pair_index.ids
    report = []
    for space in SPACES:
        vecs = pair_index.vectors[space]
        index = snap.indices[space]
        # The stored vectors are exactly the codebook lookups of the catalogue's codes.
        stored = np.stack([index.reconstruct(int(i)) for i in ids])
        np.testing.assert_array_equal(stored, vecs, err_msg=f"{space}: stored vectors")
        groups = duplicate_groups(vecs)
        members: dict[int, set[int]] = {}
        for sid, g in zip(ids.tolist(), groups.tolist(), strict=True):
            members.setdefault(g, set()).add(sid)
        shared = sum(len(m) for m in members.values() if len(m) > 1)
        report.append(f"{space}: {len(ids)} slices, {len(members)} distinct vectors, "
                      f"{shared} slices share their vector with another")
        # One query at a time, as a user's query is searched. Slices with identical vectors
        # make identical queries: search each distinct vector once, check it for every member.
        first_row = {}
        for row, g in enumerate(groups.tolist()):
            first_row.setdefault(g, row)
        for g, row in first_row.items():
            assert_first_at_zero(index, vecs[row], members[g], members[g],
                                 f"{space} slices {sorted(members[g])}")
    with capsys.disabled():
        print("\nself-retrieval duplicates: " + "; ".join(report))


def _pick_slices(stacks, n_abnormal: int = 3, n_normal: int = 2) -> list[int]:
    abnormal = np.flatnonzero(stacks.abnormal.reshape(len(stacks.abnormal), -1).any(axis=1))
    normal = np.setdiff1d(np.arange(len(stacks.slice_index)), abnormal)
    pick = lambda rows, n: rows[np.linspace(0, len(rows) - 1, n).round().astype(int)].tolist()  # noqa: E731
    return sorted(set((pick(abnormal, n_abnormal) if len(abnormal) else [])
                      + (pick(normal, n_normal) if len(normal) else [])))


def test_png_export_encodes_to_the_stored_codes(pair_index, model_books, capsys):
    model, books, _ = model_books
    snap = pair_index.snap
    cases = {c.pid: c for c in find_cases(pair_index.cohort).cases}
    originals, stored, own, abnormal_flags = [], [], [], []
    for pid, rows in snap.slices.items():
        stacks = case_slices(load_case(cases[pid], with_healthy=False))  # as the indexer reads
        for i in _pick_slices(stacks):
            row = rows[i]
            assert row[1] == stacks.slice_index[i]
            originals.append(stacks.image[i])
            stored.append((decode_codes(row[-2]), decode_codes(row[-1])))
            own.append(row[0])
            abnormal_flags.append(row[2])
    assert sum(abnormal_flags) >= 3, "pick abnormal slices too"
    stored_n = np.stack([s[0] for s in stored])
    stored_a = np.stack([s[1] for s in stored])

    groups = {space: duplicate_groups(pair_index.vectors[space]) for space in SPACES}
    members = {space: {} for space in SPACES}
    for space in SPACES:
        for sid, g in zip(pair_index.ids.tolist(), groups[space].tolist(), strict=True):
            members[space].setdefault(g, set()).add(sid)
    row_of = {sid: r for r, sid in enumerate(pair_index.ids.tolist())}

    matched = {}
    for bits in (16, 8):
        back = np.stack([image_to_slice(slice_to_png(img, bits=bits)) for img in originals])
        step = 0.5 / (65535 if bits == 16 else 255)
        assert np.abs(back - np.stack(originals)).max() <= step + 1e-7, bits
        normal, abnormal = encode_slices(model, back, 32, CPU)
        same = np.all(normal == stored_n, axis=(1, 2)) & np.all(abnormal == stored_a, axis=(1, 2))
        matched[bits] = float(same.mean())
        if bits == 8:
            continue  # reported below, not asserted: an untrained model may flip a code
        # The round trip moves a pixel by at most half a 16-bit step: a code may change only
        # where the encoder's output lay (within float rounding) as near one codebook row as
        # another, as an untrained model's can.
        flipped = np.flatnonzero(~same)
        _assert_near_ties(model, back[flipped], (stored_n[flipped], stored_a[flipped]),
                          (normal[flipped], abnormal[flipped]), [own[i] for i in flipped])
        assert same.mean() >= 0.8, matched
        queries = space_vectors(books, normal[same], abnormal[same])
        for space in SPACES:
            for q, sid in zip(queries[space], np.asarray(own)[same].tolist(), strict=True):
                assert_first_at_zero(snap.indices[space], q, {sid},
                                     members[space][groups[space][row_of[sid]]],
                                     f"16-bit PNG of slice {sid}, {space}")
    with capsys.disabled():
        print(f"\nPNG round trip of {len(own)} slices ({sum(abnormal_flags)} abnormal): codes "
              f"unchanged for {matched[16]:.0%} (16-bit), {matched[8]:.0%} (8-bit)")


def _assert_near_ties(model, images: np.ndarray, stored, found, ids) -> None:
    """Every code position where ``found`` differs from ``stored`` was a near tie: the encoder's
    output for ``images`` lies as near the stored row as the row it now takes (1e-3 relative)."""
    if not len(images):
        return
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(images[:, None]))
    for pre, quantizer, old, new in ((codes.normal_pre, model.normal_quantizer, *stored[:1],
                                      *found[:1]),
                                     (codes.abnormal_pre, model.abnormal_quantizer, *stored[1:],
                                      *found[1:])):
        z = pre.permute(0, 2, 3, 1).double()  # (S, 8, 8, 64)
        book = quantizer.codebook.double()
        for s, i, j in zip(*np.nonzero(old != new), strict=True):
            d_old = float(((z[s, i, j] - book[old[s, i, j]]) ** 2).sum())
            d_new = float(((z[s, i, j] - book[new[s, i, j]]) ** 2).sum())
            assert abs(d_old - d_new) <= 1e-3 * max(d_new, 1.0), (
                f"slice id {ids[s]}: code ({i}, {j}) moved from row {old[s, i, j]} "
                f"(squared distance {d_old:.6g}) to {new[s, i, j]} ({d_new:.6g}): not a tie")


def _brute_force_check(index: faiss.Index, data: np.ndarray, data_ids: np.ndarray,
                       queries: np.ndarray, k: int, what: str) -> None:
    dist, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    x = data.astype(np.float64)
    full = ((queries.astype(np.float64)[:, None, :] - x[None]) ** 2).sum(-1)  # (Q, N)
    col = {int(i): c for c, i in enumerate(data_ids)}
    # FAISS computes |q|^2 + |x|^2 - 2 q.x in float32 (BLAS path): beside the 1e-3 relative
    # tolerance, allow an absolute error of float32 rounding on the norms involved.
    norms = (x**2).sum(1).max()
    for q in range(len(queries)):
        atol = 1e-5 * (float((queries[q].astype(np.float64) ** 2).sum()) + norms)
        expected = np.sort(full[q])[:k]
        np.testing.assert_allclose(dist[q], expected, rtol=1e-3, atol=atol,
                                   err_msg=f"{what}: query {q} distances")
        got = ids[q].tolist()
        assert len(set(got)) == k and all(i in col for i in got), f"{what}: ids {got}"
        mine = np.array([full[q, col[i]] for i in got])
        np.testing.assert_allclose(dist[q], mine, rtol=1e-3, atol=atol,
                                   err_msg=f"{what}: query {q} reported distances of its ids")
        # Identical up to ties: every item clearly closer than the k-th is returned.
        margin = expected[-1] * 1e-3 + atol
        closer = {int(data_ids[c]) for c in np.flatnonzero(full[q] < expected[-1] - margin)}
        assert closer <= set(got), f"{what}: query {q} misses {sorted(closer - set(got))}"


def test_faiss_equals_brute_force_numpy(pair_index):
    rng = np.random.default_rng(7)
    for space in SPACES:
        data = pair_index.vectors[space]
        mu, sd = data.mean(axis=0), data.std(axis=0) + 1e-3
        random = (mu + sd * rng.normal(size=(15, data.shape[1]))).astype(np.float32)
        near = data[rng.choice(len(data), 10, replace=False)]
        near = (near + 0.1 * sd * rng.normal(size=near.shape)).astype(np.float32)
        queries = np.concatenate([random, near])  # 25 queries: FAISS's BLAS path too
        _brute_force_check(pair_index.snap.indices[space], data, pair_index.ids, queries, 10,
                           space)
        for q in queries[:3]:  # and the one-query path
            _brute_force_check(pair_index.snap.indices[space], data, pair_index.ids, q[None], 10,
                               f"{space} single")


def test_store_index_equals_brute_force_after_removals():
    """The index type the store writes, on distinct random vectors with sparse ids."""
    rng = np.random.default_rng(3)
    for space in SPACES:
        index = store.empty_index(space)
        data = rng.normal(size=(300, DIMS[space])).astype(np.float32)
        ids = np.sort(rng.choice(10**9, 300, replace=False)).astype(np.int64)
        index.add_with_ids(data, ids)
        gone = ids[::7]
        assert index.remove_ids(faiss.IDSelectorBatch(gone)) == len(gone)
        keep = ~np.isin(ids, gone)
        assert set(store.index_ids(index).tolist()) == set(ids[keep].tolist())
        queries = np.concatenate([rng.normal(size=(22, DIMS[space])), data[::50]])
        _brute_force_check(index, data[keep], ids[keep], queries.astype(np.float32), 10, space)
        for i in np.flatnonzero(keep)[:5]:
            np.testing.assert_array_equal(index.reconstruct(int(ids[i])), data[i])


# -- life cycle on SQLite and PostgreSQL -------------------------------------------------------


def test_life_cycle(db_url, mini, tiny_checkpoint, model_books, tmp_path, monkeypatch):
    books = model_books[1]
    index_dir = tmp_path / "index"
    encoded: list[int] = []
    real_encode = encoding.encode_slices

    def counting_encode(model, images, batch_size, device):
        encoded.append(len(images))
        return real_encode(model, images, batch_size, device)

    monkeypatch.setattr(encoding, "encode_slices", counting_encode)

    # build with one patient
    report = Indexer(index_dir, db_url).build([mini[A]], tiny_checkpoint, workers=0,
                                              progress=False)
    assert report.patients_added == [A] and report.skipped == []
    assert report.slices_added == sum(encoded) == MINI_SLICES, (report, encoded)
    assert store.read_manifest(index_dir)["db_url"] == db_url
    s1 = snapshot(index_dir, db_url)
    assert s1.generation == 1 and list(s1.patients) == [A]
    assert_consistent(index_dir, s1)

    # add a second patient: the first is neither re-encoded nor changed
    encoded.clear()
    report = Indexer(index_dir).add([mini[B]], workers=0, progress=False)  # URL from index.json
    s2 = snapshot(index_dir, db_url)
    assert report.operation == "add" and report.generation == s2.generation == 2
    assert report.patients_added == [B] and report.patients_removed == []
    assert report.slices_added == sum(encoded) == len(s2.slices[B]), (report, encoded)
    assert report.total_patients == 2 and report.total_slices == len(s2.ids())
    assert s2.patients[A] == s1.patients[A], "the first patient's row changed"
    assert s2.slices[A] == s1.slices[A], "the first patient's slices changed"
    assert min(s2.ids(B)) > max(s1.ids(A))
    assert_consistent(index_dir, s2)

    # an existing patient without replace is refused, before any encoding, and nothing changes
    encoded.clear()
    with pytest.raises(IndexStoreError, match=rf"already indexed: {A}; pass --replace"):
        Indexer(index_dir).add([mini[A]], workers=0, progress=False)
    assert encoded == []
    s3 = snapshot(index_dir, db_url)
    assert (s3.generation, s3.patients, s3.slices) == (s2.generation, s2.patients, s2.slices)

    # replace: new slice ids, the old ones gone from the catalogue and all three indices
    report = Indexer(index_dir).add([mini[A]], replace=True, workers=0, progress=False)
    s4 = snapshot(index_dir, db_url)
    assert report.operation == "replace"
    assert report.patients_added == [A] and report.patients_removed == [A]
    old, new = s2.ids(A), s4.ids(A)
    assert len(new) == len(old) and min(new) > max(s2.ids()), "ids must be new, never reused"
    assert not old & s4.ids(), "old ids still in the catalogue"
    for space in SPACES:
        assert not old & s4.index_ids[space], f"old ids of {A} still in the {space} index"
        assert new <= s4.index_ids[space], space
    assert [r[1:] for r in s4.slices[A]] == [r[1:] for r in s2.slices[A]], (
        "same checkpoint and data: same slices and codes")
    assert s4.slices[B] == s2.slices[B] and s4.patients[B] == s2.patients[B]
    assert s4.patients[A][0] != s2.patients[A][0]
    assert not store.thumbnail_path(index_dir, s2.patients[A][0]).exists()
    assert_consistent(index_dir, s4)

    # remove: never returned again, in any space
    a_ids, a_vectors = s4.vectors(books, A)
    report = Indexer(index_dir).remove([A])
    s5 = snapshot(index_dir, db_url)
    assert report.operation == "remove" and report.patients_removed == [A]
    assert report.patients_added == [] and report.total_patients == 1
    assert list(s5.patients) == [B] and s5.slices[B] == s2.slices[B]
    gone = set(a_ids.tolist()) | old
    for space in SPACES:
        assert not gone & s5.index_ids[space], f"{space} index still holds {A}"
        index = s5.indices[space]
        _, hits = index.search(a_vectors[space], index.ntotal)
        returned = set(hits.ravel().tolist())
        assert not gone & returned, f"{space} search returned removed ids {gone & returned}"
        assert returned == s5.ids(B), space
    assert not store.thumbnail_path(index_dir, s4.patients[A][0]).exists()
    assert_consistent(index_dir, s5)

    with pytest.raises(IndexStoreError, match=rf"not in the index: {A}, NOPE"):
        Indexer(index_dir).remove(["NOPE", A])
    assert snapshot(index_dir, db_url).generation == s5.generation


def test_adding_with_another_checkpoint_is_refused(fresh, mini, other_checkpoint, model_books):
    before = snapshot(fresh)
    with pytest.raises(IndexStoreError, match="codes of different models cannot be mixed") as exc:
        Indexer(fresh).add([mini[C]], other_checkpoint, workers=0, progress=False)
    assert model_books[2]["weights_sha256"][:12] in str(exc.value), str(exc.value)
    after = snapshot(fresh)
    assert (after.generation, after.patients) == (before.generation, before.patients)
    assert_consistent(fresh, after)


def test_unreadable_patient_is_skipped_and_named(mini, tiny_checkpoint, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(mini[C] / C, cohort / C)
    shutil.copytree(mini[D] / D, cohort / D)
    t1ce = cohort / D / f"{D}_t1ce.nii.gz"
    raw = t1ce.read_bytes()
    t1ce.write_bytes(raw[: len(raw) // 2])
    (cohort / "NOT_0001").mkdir()
    (cohort / "NOT_0001" / "NOT_0001_seg.nii.gz").write_bytes(b"")
    report = Indexer(tmp_path / "index").build([cohort], tiny_checkpoint, workers=1,
                                               progress=False)
    assert report.patients_added == [C], report
    skipped = dict(report.skipped)
    assert set(skipped) == {str(cohort / D), str(cohort / "NOT_0001")}, report.skipped
    assert f"{D}_t1ce.nii.gz" in skipped[str(cohort / D)], skipped
    assert "truncated or corrupt" in skipped[str(cohort / D)], skipped
    assert "missing NOT_0001_t1ce.nii.gz" in skipped[str(cohort / "NOT_0001")], skipped
    snap = snapshot(tmp_path / "index")
    assert list(snap.patients) == [C] and len(snap.slices[C]) == MINI_SLICES
    assert_consistent(tmp_path / "index", snap)


def test_patient_without_brain_slices_does_not_stop_the_build(mini, tiny_checkpoint, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(mini[C] / C, cohort / C)
    ref = nib.load(cohort / C / f"{C}_t1ce.nii.gz")
    blob = np.zeros(ref.shape, np.float32)
    blob[100:110, 100:110, 3:6] = 1.0  # readable, but 100 brain pixels per slice at most
    (cohort / "TINY_0001").mkdir()
    nib.save(nib.Nifti1Image(blob, ref.affine), cohort / "TINY_0001" / "TINY_0001_t1ce.nii.gz")
    report = Indexer(tmp_path / "index").build([cohort], tiny_checkpoint, workers=0,
                                               progress=False)
    assert report.patients_added[0] == C
    assert "TINY_0001" in str(report.skipped) or "TINY_0001" in report.patients_added


# -- verify catches injected inconsistencies ---------------------------------------------------


def test_verify_names_a_vector_missing_from_one_index(fresh):
    victim = sorted(snapshot(fresh).ids(B))[3]
    rewrite_index(fresh, "normal", lambda ix: ix.remove_ids(faiss.IDSelectorBatch(
        np.array([victim], np.int64))))
    problems = verify(fresh)
    assert len(problems) == 1, problems
    assert "normal index lacks 1 slice id" in problems[0] and str(victim) in problems[0], problems


def test_verify_names_a_catalogue_row_without_vector(fresh):
    snap = snapshot(fresh)
    new_id = max(snap.ids()) + 1000
    engine = make_engine(store.default_db_url(fresh))
    with Session(engine) as session:
        template = session.get(Slice, max(snap.ids(A)))
        session.add(Slice(id=new_id, patient_id=template.patient_id, slice_index=999,
                          has_abnormality=False, brain_area=1000,
                          normal_codes=template.normal_codes,
                          abnormal_codes=template.abnormal_codes))
        session.commit()
    engine.dispose()
    problems = verify(fresh)
    text = "\n".join(problems)
    for space in SPACES:
        assert any(p.startswith(f"{space} index lacks 1 slice id") and str(new_id) in p
                   for p in problems), text
    assert f"patient {A} records {MINI_SLICES} slices, the catalogue holds {MINI_SLICES + 1}" \
        in text, text
    assert "records 20 slices, the catalogue holds 21" in text, text


def test_verify_names_a_vector_without_catalogue_row(fresh, model_books):
    rewrite_index(fresh, "concat", lambda ix: ix.add_with_ids(
        np.zeros((1, DIMS["concat"]), np.float32), np.array([10**9], np.int64)))
    problems = verify(fresh)
    assert problems == ["concat index holds 1 slice id(s) not in the catalogue: 1000000000"], \
        problems


@pytest.mark.parametrize("chunk", [verify_module.VECTOR_CHUNK, 3])
def test_verify_names_a_modified_vector(fresh, chunk, monkeypatch):
    """Found whether the vectors are compared all at once or 3 slices at a time."""
    monkeypatch.setattr(verify_module, "VECTOR_CHUNK", chunk)
    victim = sorted(snapshot(fresh).ids(A))[-1]  # last of its patient: not in the first chunk

    def change(ix):
        vec = ix.reconstruct(victim)
        ix.remove_ids(faiss.IDSelectorBatch(np.array([victim], np.int64)))
        ix.add_with_ids((vec + 0.5)[None], np.array([victim], np.int64))

    rewrite_index(fresh, "abnormal", change)
    problems = verify(fresh)
    assert len(problems) == 1, problems
    assert "abnormal index: 1 vector(s) differ from the codes in the catalogue" in problems[0]
    assert problems[0].endswith(f"slice id(s) {victim}"), problems


def test_verify_names_duplicate_ids(fresh):
    victim = sorted(snapshot(fresh).ids(A))[0]
    rewrite_index(fresh, "normal", lambda ix: ix.add_with_ids(
        ix.reconstruct(victim)[None], np.array([victim], np.int64)))
    problems = verify(fresh)
    assert problems == ["normal index holds duplicate ids"], problems


def test_verify_names_a_missing_thumbnails_file(fresh):
    patient_id = snapshot(fresh).patients[B][0]
    store.thumbnail_path(fresh, patient_id).unlink()
    problems = verify(fresh)
    assert problems == [f"patient {B}: thumbnails file {patient_id}.npz is missing"], problems


def test_verify_names_a_missing_index_file(fresh):
    path = store.faiss_path(fresh, "abnormal", snapshot(fresh).generation)
    path.unlink()
    problems = verify(fresh)
    assert len(problems) == 1 and str(path) in problems[0], problems
    assert "index file of the active generation is missing" in problems[0], problems


def test_verify_names_a_checkpoint_mismatch(fresh, other_checkpoint, model_books):
    problems = verify(fresh, checkpoint=other_checkpoint)
    assert len(problems) == 1, problems
    assert str(other_checkpoint) in problems[0], problems
    assert f"the index was built with {model_books[2]['weights_sha256'][:12]}" in problems[0]
    assert verify(fresh) == []  # the manifest's checkpoint is the right one


def test_verify_names_a_checkpoint_that_is_gone(fresh, tmp_path):
    manifest = store.read_manifest(fresh)
    manifest.pop("format")
    store.write_manifest(fresh, {**manifest, "checkpoint": str(tmp_path / "gone.pt")})
    problems = verify(fresh)
    assert len(problems) == 1, problems
    assert "cannot check vectors" in problems[0] and "gone.pt" in problems[0], problems


def test_verify_names_every_inconsistency_at_once(fresh):
    snap = snapshot(fresh)
    victim = sorted(snap.ids(A))[1]
    rewrite_index(fresh, "normal", lambda ix: ix.remove_ids(faiss.IDSelectorBatch(
        np.array([victim], np.int64))))
    store.thumbnail_path(fresh, snap.patients[A][0]).unlink()
    problems = verify(fresh)
    assert len(problems) == 2, problems
    assert any("normal index lacks 1 slice id" in p and str(victim) in p for p in problems)
    assert any(f"patient {A}: thumbnails file" in p for p in problems), problems


# -- the command line --------------------------------------------------------------------------


def test_cli_index_commands(mini, tiny_checkpoint, tmp_path):
    index = tmp_path / "index"
    result = invoke("index", "build", "--data", mini[A], "--out", index, "--checkpoint",
                    tiny_checkpoint, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert f"build: generation 1; 1 patients / {MINI_SLICES} slices added" in result.output
    assert re.search(r"\(\d+\.\d slices/s\)", result.output), result.output
    assert re.search(r"bytes per slice: normal 16,\d{3} B, abnormal 16,\d{3} B, concat "
                     r"32,\d{3} B; index files \d+\.\d MiB", result.output), result.output

    result = invoke("index", "build", "--data", mini[B], "--out", index, "--checkpoint",
                    tiny_checkpoint)
    assert result.exit_code == 2 and "already holds an index" in result.output, result.output

    result = invoke("index", "add", "--index", index, "--data", mini[B], "--workers", 0)
    assert result.exit_code == 0, result.output
    assert f"index now 2 patients, {2 * MINI_SLICES} slices" in result.output, result.output
    assert "slices/s" in result.output and "bytes per slice" in result.output

    result = invoke("index", "add", "--index", index, "--data", mini[B], "--workers", 0)
    assert result.exit_code == 2, result.output
    assert f"error: already indexed: {B}; pass --replace" in result.output, result.output

    result = invoke("index", "add", "--index", index, "--data", mini[B], "--replace",
                    "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "1 patients / 10 slices added, 1 patients removed" in result.output, result.output

    result = invoke("index", "stats", "--index", index)
    assert result.exit_code == 0, result.output
    assert f"2 patients, {2 * MINI_SLICES} slices" in result.output, result.output
    assert re.search(r"\d+\.\d% with abnormality", result.output), result.output
    assert re.search(r"normal: \d+\.\d MiB, 16,\d{3} B per slice", result.output), result.output

    result = invoke("index", "verify", "--index", index)
    assert result.exit_code == 0 and "consistent" in result.output, result.output

    result = invoke("index", "remove", "--index", index, "--patient", A)
    assert result.exit_code == 0, result.output
    assert "1 patients removed; index now 1 patients" in result.output, result.output
    result = invoke("index", "remove", "--index", index, "--patient", "NOPE")
    assert result.exit_code == 2 and "error: not in the index: NOPE" in result.output

    # inject two inconsistencies: verify exits 1 and names each
    snap = snapshot(index)
    victim = sorted(snap.ids(B))[0]
    rewrite_index(index, "normal", lambda ix: ix.remove_ids(faiss.IDSelectorBatch(
        np.array([victim], np.int64))))
    store.thumbnail_path(index, snap.patients[B][0]).unlink()
    result = invoke("index", "verify", "--index", index)
    assert result.exit_code == 1, result.output
    assert f"inconsistent: normal index lacks 1 slice id(s) of the catalogue: {victim}" \
        in result.output, result.output
    assert f"inconsistent: patient {B}: thumbnails file" in result.output, result.output
    assert "consistent\n" not in result.output.replace("inconsistent", "")


def test_cli_reports_skipped_patients(mini, tiny_checkpoint, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(mini[C] / C, cohort / C)
    (cohort / "NOT_0002").mkdir()
    result = invoke("index", "build", "--data", cohort, "--out", tmp_path / "index",
                    "--checkpoint", tiny_checkpoint, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert f"skipped {cohort / 'NOT_0002'}: missing NOT_0002_t1ce.nii.gz" in result.output


@pytest.mark.parametrize("command", [
    ["verify"], ["stats"], ["remove", "--patient", A], ["add", "--data", "."]])
def test_cli_refuses_a_missing_index(command, tmp_path):
    missing = tmp_path / "no-index"
    result = invoke("index", command[0], "--index", missing, *command[1:])
    assert result.exit_code == 2, result.output
    assert f"error: {missing}: not an index directory (no index.json)" in result.output


def test_cli_refuses_a_missing_checkpoint(mini, fresh, tmp_path):
    nowhere = tmp_path / "none.pt"
    result = invoke("index", "build", "--data", mini[A], "--out", tmp_path / "new",
                    "--checkpoint", nowhere)
    assert result.exit_code == 2, result.output
    assert f"error: {nowhere}: no checkpoint there" in result.output, result.output
    result = invoke("index", "add", "--index", fresh, "--data", mini[C], "--checkpoint", nowhere)
    assert result.exit_code == 2, result.output
    assert f"error: {nowhere}: no checkpoint there" in result.output, result.output
    assert verify(fresh) == []
    if not DEFAULT_CHECKPOINT.is_file():  # no shipped checkpoint in this checkout
        result = invoke("index", "build", "--data", mini[A], "--out", tmp_path / "new2")
        assert result.exit_code == 2, result.output
        assert "no checkpoint there; pass --checkpoint" in result.output, result.output


def test_cli_refuses_a_missing_data_folder(tiny_checkpoint, tmp_path):
    result = invoke("index", "build", "--data", tmp_path / "nope", "--out", tmp_path / "index",
                    "--checkpoint", tiny_checkpoint)
    assert result.exit_code == 2, result.output
    assert f"error: {tmp_path / 'nope'}: no such data folder" in result.output, result.output


def test_cli_build_can_be_retried_after_a_bad_data_folder(mini, tiny_checkpoint, tmp_path):
    index = tmp_path / "index"
    result = invoke("index", "build", "--data", tmp_path / "nope", "--out", index,
                    "--checkpoint", tiny_checkpoint)
    assert result.exit_code == 2, result.output
    result = invoke("index", "build", "--data", mini[A], "--out", index, "--checkpoint",
                    tiny_checkpoint, "--workers", 0)
    assert result.exit_code == 0, result.output


def test_cli_add_to_a_missing_index_creates_nothing(mini, tmp_path):
    missing = tmp_path / "no-index"
    result = invoke("index", "add", "--index", missing, "--data", mini[C])
    assert result.exit_code == 2, result.output
    assert not missing.exists(), f"{missing} was created: {list(missing.iterdir())}"


def test_cli_verify_refuses_a_missing_checkpoint(fresh, tmp_path):
    nowhere = tmp_path / "none.pt"
    result = invoke("index", "verify", "--index", fresh, "--checkpoint", nowhere)
    assert str(nowhere) in result.output, result.output
    assert result.exit_code == 2, result.output


# -- reference distances, stored per generation -------------------------------------------------


def _measured_now(index_dir: Path, books: dict) -> Reference:
    """The reference measured from the catalogue as it stands (what each write must store)."""
    engine = make_engine(store.default_db_url(index_dir))
    with Session(engine) as session:
        rows = session.execute(select(Slice.patient_id, Slice.normal_codes,
                                      Slice.abnormal_codes).order_by(Slice.id)).all()
    engine.dispose()
    codes = np.stack([np.stack([decode_codes(r.normal_codes), decode_codes(r.abnormal_codes)])
                      for r in rows])
    return Reference.measure(books, codes, np.array([r.patient_id for r in rows]))


def test_every_write_stores_the_reference_of_its_generation(fresh, mini, model_books):
    """build, add and remove each store the new generation's between-patient nearest-neighbour
    distances, measured with the model's codebooks; the old generation's file goes with its
    FAISS files."""
    _, books, _ = model_books
    for step in ("build", "add", "remove"):
        if step == "add":
            Indexer(fresh).add([mini[C]], workers=0, progress=False)
        elif step == "remove":
            Indexer(fresh).remove([A])
        gen = snapshot(fresh).generation
        path = store.reference_path(fresh, gen)
        stored = Reference.load(path, books)
        assert stored is not None, step
        expected = _measured_now(fresh, books)
        assert stored.sampled == expected.sampled
        for space in SPACES:
            assert np.array_equal(stored.distances[space], expected.distances[space]), step
        assert sorted(p.name for p in (fresh / store.FAISS_DIR).glob("reference-*")) == [
            path.name], step
    # Measured with other codebooks, a stored reference is not used.
    other = {name: book + 1.0 for name, book in books.items()}
    assert Reference.load(store.reference_path(fresh, snapshot(fresh).generation), other) is None


def test_one_patient_stores_no_reference(mini, tiny_checkpoint, tmp_path):
    out = tmp_path / "one"
    Indexer(out).build([mini[A]], tiny_checkpoint, workers=0, progress=False)
    assert not list((out / store.FAISS_DIR).glob("reference-*"))
