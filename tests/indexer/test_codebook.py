"""The codebook kind of index (``indexer/codebook.py``) against the flat one.

Invariants: its codes are FAISS's own PQ codes of the stored vectors; on random codes and on real
encoded slices, in all three spaces, with and without the service's filters, its ranking equals
the flat index's and a brute-force float64 one (ties broken by id) and its distances equal theirs
within float32 rounding; `cbir index build/add/remove/verify/stats --kind codebook` end to end,
and the same answers through the API as a flat index of the same patients.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer import codebook, store
from indexer.build import Indexer, codebooks_of
from indexer.catalog import decode_codes
from indexer.faiss_lib import faiss
from indexer.layout import DIMS, POSITIONS, SPACES, space_vectors
from indexer.verify import stats, verify
from model.checkpoint import load_model
from tests.indexer.test_build import invoke, make_mini_patient, snapshot

K = 512


# -- helpers -----------------------------------------------------------------------------------


def random_books(rng) -> dict[str, np.ndarray]:
    books = {"normal": rng.normal(size=(K, 64)).astype(np.float32),
             "abnormal": (0.3 * rng.normal(size=(K, 64))).astype(np.float32)}
    books["abnormal"][0] = 0.0  # the lesion-free code (--null-code)
    return books


def random_codes(rng, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal codes drawn from 300 distinct ones (identical vectors tie), abnormal codes null for
    the 70 % of slices without a lesion; and those slices' lesion flags."""
    distinct = rng.integers(0, K, size=(300, 8, 8))
    normal = distinct[rng.integers(0, len(distinct), size=n)]
    lesion = rng.random(n) < 0.3
    abnormal = np.zeros((n, 8, 8), np.int64)
    abnormal[lesion] = rng.integers(0, K, size=(int(lesion.sum()), 8, 8))
    return normal, abnormal, lesion


def both_kinds(books, normal, abnormal, ids) -> dict[str, dict[str, faiss.Index]]:
    out = {kind: store.empty_indices(kind, books) for kind in store.KINDS}
    for indices in out.values():
        store.add_slices(indices, books, normal, abnormal, ids)
    return out


def canonical_distances(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Squared L2 in float64, as a sum of per-position terms added in sorted order: two slices
    whose terms are the same multiset (same codes, or the same code pairs at other positions)
    get the same number, so a tie is a tie."""
    diff = vectors.astype(np.float64) - query.astype(np.float64)  # (N, d)
    terms = (diff ** 2).reshape(len(vectors), -1, 64).sum(-1)  # (N, positions)
    return np.sort(terms, axis=1).sum(1)


def assert_ranks_like_brute_force(indices: dict[str, faiss.Index], query: np.ndarray,
                                  vectors: np.ndarray, ids: np.ndarray,
                                  filters: dict[str, np.ndarray], k: int, what: str) -> None:
    """With each filter (a mask over ``ids``), each index's k nearest, ties broken by id, are
    the brute-force k nearest.

    Each index is asked for every slice within float32 rounding of the k-th distance, so a tie
    group at the boundary comes back whole; its answer re-sorted by (exact distance, id) must
    start with the expected k, and its distances must be the exact ones within rounding."""
    every = canonical_distances(query, vectors)
    tol = 1e-5 * (float((query.astype(np.float64) ** 2).sum())
                  + float((vectors.astype(np.float64) ** 2).sum(1).max()))
    for name, keep in filters.items():
        _assert_filtered(indices, query, every[keep], ids[keep], keep.all(), k, tol,
                         f"{what} filter {name}")


def _assert_filtered(indices, query, exact, cand, unfiltered: bool, k: int, tol: float,
                     what: str) -> None:
    order = np.lexsort((cand, exact))
    k = min(k, len(cand))
    expected = cand[order][:k]
    m = int((exact <= exact[order][k - 1] + tol).sum())
    col = {int(i): c for c, i in enumerate(cand)}
    params = None
    for kind, index in indices.items():
        if not unfiltered:
            params = store.search_parameters(index, faiss.IDSelectorBatch(cand))
        dist, got = index.search(np.ascontiguousarray(query[None], np.float32), m, params=params)
        dist, got = dist[0], got[0]
        assert (got >= 0).all() and len(set(got.tolist())) == m, f"{what} {kind}: ids {got}"
        assert set(got.tolist()) <= set(cand.tolist()), f"{what} {kind}: a filtered-out id"
        mine = exact[[col[int(i)] for i in got]]
        np.testing.assert_allclose(dist, mine, rtol=0, atol=tol,
                                   err_msg=f"{what} {kind}: distances")
        ranked = got[np.lexsort((got, mine))][:k]
        assert ranked.tolist() == expected.tolist(), f"{what} {kind}: {ranked} != {expected}"


def queries_for(rng, books, normal, abnormal, space: str) -> np.ndarray:
    """Stored slices' own vectors, fresh codes, and float vectors between codebook entries."""
    fresh_n, fresh_a, _ = random_codes(rng, 3)
    own = space_vectors(books, normal[:3], abnormal[:3], spaces=(space,))[space]
    new = space_vectors(books, fresh_n, fresh_a, spaces=(space,))[space]
    noisy = (own + 0.2 * rng.normal(size=own.shape)).astype(np.float32)
    return np.concatenate([own, new, noisy])


# -- the codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [512, 500])
def test_packed_codes_are_faiss_pq_codes(size):
    """Packing the model's code indices gives what FAISS's PQ encoder gives for their vectors
    (the codebook lookups), without running it; a codebook of fewer than 2**9 rows is padded."""
    rng = np.random.default_rng(0)
    books = {p: rng.normal(size=(size, 64)).astype(np.float32) for p in ("normal", "abnormal")}
    normal, abnormal = (rng.integers(0, size, size=(50, 8, 8)) for _ in range(2))
    bits = codebook.nbits(size)
    assert bits == 9
    codes = codebook.space_codes(normal, abnormal, bits)
    vectors = space_vectors(books, normal, abnormal)
    for space in SPACES:
        index = codebook.make_index(space, books)
        assert index.code_size == DIMS[space] // 64 * 9 // 8  # 72 or 144 bytes
        np.testing.assert_array_equal(codes[space], index.sa_encode(vectors[space]), space)
        np.testing.assert_array_equal(index.sa_decode(codes[space]), vectors[space], space)
    back = codebook.unpack(codes["concat"], 2 * POSITIONS, bits)
    np.testing.assert_array_equal(back, np.concatenate([normal.reshape(50, -1),
                                                        abnormal.reshape(50, -1)], axis=1))
    with pytest.raises(ValueError, match="outside 0..511"):
        codebook.pack(np.full((1, 64), 512), bits)


# -- rankings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("space", "scan_chunk"), [
    *((s, codebook.SCAN_CHUNK) for s in SPACES),
    ("concat", 64),  # concat scanned in ranges of 64 ids, across the removed patient's hole
])
def test_codebook_ranks_like_flat_on_random_codes(space, scan_chunk, monkeypatch):
    monkeypatch.setattr(codebook, "SCAN_CHUNK", scan_chunk)
    rng = np.random.default_rng(5)
    books = random_books(rng)
    n = 600
    normal, abnormal, lesion = random_codes(rng, n)
    ids = np.arange(1, n + 1, dtype=np.int64)
    patient = (ids - 1) // 40  # 20 patients of 40 slices
    indices = {kind: dict(v) for kind, v in both_kinds(books, normal, abnormal, ids).items()}
    # removals and a later add, as `cbir index remove/add` make them
    gone = np.flatnonzero(patient == 3)
    for kind in store.KINDS:
        removed = store.remove_slices(indices[kind], ids[gone])
        assert removed == {s: len(gone) for s in store.stored_spaces(kind)}, removed
    later_n, later_a, later_l = random_codes(rng, 40)
    later_ids = np.arange(n + 1, n + 41, dtype=np.int64)
    for kind in store.KINDS:
        store.add_slices(indices[kind], books, later_n, later_a, later_ids)
    held = np.setdiff1d(np.arange(n), gone)
    normal = np.concatenate([normal[held], later_n])
    abnormal = np.concatenate([abnormal[held], later_a])
    lesion = np.concatenate([lesion[held], later_l])
    ids = np.concatenate([ids[held], later_ids])
    patient = np.concatenate([patient[held], np.full(40, 99)])
    for kind in store.KINDS:
        np.testing.assert_array_equal(store.index_ids(indices[kind][space]), ids, kind)

    vectors = space_vectors(books, normal, abnormal, spaces=(space,))[space]
    filters = {"none": np.ones(len(ids), bool), "has_abnormality": lesion,
               "no abnormality": ~lesion, "exclude_patient": patient != 5}
    pair = {kind: indices[kind][space] for kind in store.KINDS}
    for q, query in enumerate(queries_for(rng, books, normal, abnormal, space)):
        assert_ranks_like_brute_force(pair, query, vectors, ids, filters, 10,
                                      f"{space} query {q}")
        for name, keep in filters.items():
            # FAISS's own top 10 (what the service returns) is the same in both kinds: random
            # codes tie only between identical vectors, and both kinds give those to the
            # smaller id.
            params = {kind: None if keep.all() else store.search_parameters(
                pair[kind], faiss.IDSelectorBatch(ids[keep])) for kind in store.KINDS}
            got = {kind: pair[kind].search(query[None], 10, params=params[kind])[1][0]
                   for kind in store.KINDS}
            assert got["flat"].tolist() == got["codebook"].tolist(), (space, q, name, got)


@pytest.fixture(scope="module")
def encoded_pair(synth_cohort, tiny_checkpoint, tmp_path_factory):
    """Two synthetic patients, 90 axial planes each around their lesion, indexed with --kind
    codebook (real encoded slices), and a snapshot of the index."""
    base = tmp_path_factory.mktemp("codebook-pair")
    for i, src in enumerate(sorted(p for p in synth_cohort.iterdir() if p.is_dir())[:2]):
        make_mini_patient(src, base / "cohort", f"PAIR_{i:04d}", n=90)
    report = Indexer(base / "index").build([base / "cohort"], tiny_checkpoint, kind="codebook",
                                           workers=1, progress=False)
    return base / "index", report, snapshot(base / "index")


def test_codebook_ranks_like_flat_on_encoded_slices(encoded_pair, tiny_checkpoint):
    index_dir, report, snap = encoded_pair
    model, _ = load_model(tiny_checkpoint)
    books = codebooks_of(model)
    rows = [r for pid in snap.slices for r in snap.slices[pid]]
    ids = np.array([r[0] for r in rows], np.int64)
    normal = np.stack([decode_codes(r[-2]) for r in rows])
    abnormal = np.stack([decode_codes(r[-1]) for r in rows])
    lesion = np.array([bool(r[2]) for r in rows])
    first_patient = np.array([r[0] in snap.ids(next(iter(snap.slices))) for r in rows])
    assert report.kind == "codebook" and len(ids) >= 60 and 0 < lesion.sum() < len(ids)

    # What the index holds is the catalogue's codes, packed, with the checkpoint's codebooks.
    width = {"normal": POSITIONS, "abnormal": POSITIONS, "concat": 2 * POSITIONS}
    flat_codes = {"normal": normal.reshape(len(ids), -1),
                  "abnormal": abnormal.reshape(len(ids), -1)}
    flat_codes["concat"] = np.concatenate([flat_codes["normal"], flat_codes["abnormal"]], axis=1)
    for space in codebook.STORED:
        index = snap.indices[space]
        assert store.index_kind(index) == "codebook"
        assert store.kind_problem(index, space, "codebook", books) is None
        held, codes = codebook.stored(faiss.downcast_index(index))
        np.testing.assert_array_equal(held, ids)
        np.testing.assert_array_equal(codebook.unpack(codes, width[space], 9), flat_codes[space])
    # concat is read from those two: no third copy of the codes, no file
    assert isinstance(snap.indices["concat"], codebook.ConcatScan)
    np.testing.assert_array_equal(store.index_ids(snap.indices["concat"]), ids)
    assert not store.faiss_path(index_dir, "concat", snap.generation).exists()

    flat = {s: store.empty_index(s, "flat") for s in SPACES}
    store.add_slices(flat, books, normal, abnormal, ids)  # what a flat build of them holds
    vectors = space_vectors(books, normal, abnormal)
    rng = np.random.default_rng(2)
    picks = rng.choice(len(ids), 8, replace=False)
    filters = {"none": np.ones(len(ids), bool), "has_abnormality": lesion,
               "no abnormality": ~lesion, "exclude_patient": ~first_patient}
    for space in SPACES:
        pair = {"flat": flat[space], "codebook": snap.indices[space]}
        for row in picks:
            assert_ranks_like_brute_force(pair, vectors[space][row], vectors[space], ids,
                                          filters, 10, f"{space} slice {ids[row]}")


def assert_same_ranking(d_a, i_a, d_b, i_b, what, rtol: float = 1e-5) -> None:
    """Two answers rank alike: the same id at each rank, except that ids whose distances agree
    within float32 rounding (``rtol``) may swap; one found only by one answer must lie within
    rounding of the other's last distance (a tie at the k-th rank)."""
    for row, (da, ia, db, ib) in enumerate(zip(d_a, i_a, d_b, i_b, strict=True)):
        where_b = {int(i): float(d) for d, i in zip(db, ib, strict=True)}
        for rank in np.nonzero(ia != ib)[0]:
            tol = rtol * max(abs(float(da[rank])), 1.0)
            other = where_b.get(int(ia[rank]), float(db[-1]))
            assert abs(other - float(da[rank])) <= tol, (what, row, rank, ia[rank], ib[rank])


def test_concat_scan_answers_as_a_stored_concat_index(monkeypatch):
    """The concat space read from the normal and abnormal indices answers batched queries, with
    and without a filter, scanned in ranges or in one go, and k beyond what passes (padded with
    id -1 as FAISS pads), as a stored 128-position index of the same codes; two parts holding
    different slices are named."""
    rng = np.random.default_rng(8)
    books = random_books(rng)
    normal, abnormal, lesion = random_codes(rng, 300)
    ids = np.arange(1000, 1300, dtype=np.int64)
    indices = store.empty_indices("codebook", books)
    store.add_slices(indices, books, normal, abnormal, ids)
    assert isinstance(indices["concat"], codebook.ConcatScan) and indices["concat"].ntotal == 300
    stored = codebook.make_index("concat", books)
    codebook.add(stored, codebook.space_codes(normal, abnormal, 9)["concat"], ids)
    queries = np.concatenate([space_vectors(books, normal[:4], abnormal[:4])["concat"],
                              rng.normal(size=(2, DIMS["concat"])).astype(np.float32)])
    for chunk in (codebook.SCAN_CHUNK, 64, 1):
        monkeypatch.setattr(codebook, "SCAN_CHUNK", chunk)
        for keep, k in ((None, 10), (None, 400), (lesion, 10), (lesion, 200)):
            params = {name: None if keep is None else store.search_parameters(
                index, faiss.IDSelectorBatch(ids[keep]))
                for name, index in (("scan", indices["concat"]), ("stored", stored))}
            d_scan, i_scan = indices["concat"].search(queries, k, params=params["scan"])
            d_stored, i_stored = stored.search(queries, k, params=params["stored"])
            np.testing.assert_allclose(d_scan, d_stored, rtol=1e-5)
            assert_same_ranking(d_scan, i_scan, d_stored, i_stored, (chunk, k))
            assert (i_scan == -1).sum() == len(queries) * max(
                0, k - (300 if keep is None else int(keep.sum())))
    codebook.remove_ids(indices["abnormal"], ids[:1])
    with pytest.raises(ValueError, match="hold different slice ids"):
        indices["concat"].search(queries[:1], 5)


def test_search_index_keeps_the_codebook_kind_on_the_cpu():
    books = random_books(np.random.default_rng(0))
    index = store.empty_index("normal", "codebook", books)
    assert store.search_index(index) is index


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")
def test_flat_search_on_the_gpu_equals_the_cpu():
    rng = np.random.default_rng(4)
    books = random_books(rng)
    normal, abnormal, _ = random_codes(rng, 500)
    ids = np.arange(10, 510, dtype=np.int64)
    indices = both_kinds(books, normal, abnormal, ids)["flat"]
    for space in SPACES:
        gpu = store.search_index(indices[space])
        assert gpu is not indices[space]
        queries = space_vectors(books, normal[:8], abnormal[:8], spaces=(space,))[space]
        d_cpu, i_cpu = indices[space].search(queries, 10)
        d_gpu, i_gpu = gpu.search(queries, 10)
        np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-4, atol=1e-2)
        assert (i_gpu[:, 0] == i_cpu[:, 0]).all(), space


# -- the index directory -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minis(synth_cohort, tmp_path_factory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("codebook-mini")
    out = {}
    for i, src in enumerate(sorted(p for p in synth_cohort.iterdir() if p.is_dir())[:3]):
        pid = f"CB_{i:04d}"
        make_mini_patient(src, base / pid, pid)
        out[pid] = base / pid
    return out


def _similar(client, slice_id: int, **params) -> list[tuple[int, float]]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    r = client.post(f"/slices/{slice_id}/similar?{query}")
    assert r.status_code == 200, r.text
    return [(h["slice_id"], h["distance"], h["patient_id"]) for h in r.json()["neighbors"]]


def test_cli_codebook_index_end_to_end(minis, tiny_checkpoint, tmp_path):
    """build, add, a refused --kind, remove, stats and verify with --kind codebook; then the
    API answers searches (filters, group=patient, an upload) as a flat index of the same
    patients does."""
    from service.api.app import create_app
    from service.config import Settings

    a, b, c = minis
    dirs = {kind: tmp_path / kind for kind in store.KINDS}
    for kind, index in dirs.items():
        result = invoke("index", "build", "--data", minis[a], "--out", index, "--checkpoint",
                        tiny_checkpoint, "--workers", 0, "--kind", kind)
        assert result.exit_code == 0, result.output
        assert store.read_manifest(index)["kind"] == kind
    assert ("bytes per slice: normal 80 B, abnormal 80 B, concat read from normal and abnormal; "
            "index files" in result.output), result.output  # 72 bytes of code, an 8-byte id
    out = invoke("index", "build", "--data", minis[a], "--out", dirs["codebook"], "--checkpoint",
                 tiny_checkpoint, "--kind", "codebook").output
    assert "already holds an index" in out, out

    result = invoke("index", "add", "--index", dirs["codebook"], "--data", minis[b],
                    "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "codebook index; " in result.output and "MiB of that the codebooks" in result.output
    result = invoke("index", "add", "--index", dirs["codebook"], "--data", minis[c],
                    "--workers", 0, "--kind", "flat")
    assert result.exit_code == 2, result.output
    assert (f"error: {dirs['codebook']} holds a codebook index (index.json); --kind flat "
            f"conflicts with it") in result.output, result.output
    result = invoke("index", "add", "--index", dirs["codebook"], "--data", minis[c],
                    "--workers", 0, "--kind", "codebook")
    assert result.exit_code == 0, result.output
    for args in (["--data", minis[b]], ["--data", minis[c]]):
        result = invoke("index", "add", "--index", dirs["flat"], *args, "--workers", 0)
        assert result.exit_code == 0 and "(flat index)" in result.output, result.output
    for kind, index in dirs.items():
        result = invoke("index", "remove", "--index", index, "--patient", b)
        assert result.exit_code == 0, result.output
        result = invoke("index", "verify", "--index", index)
        assert result.exit_code == 0, result.output
        assert f"consistent ({kind} index)" in result.output, result.output

    s = stats(dirs["codebook"])
    assert (s["kind"], s["patients"], s["slices"]) == ("codebook", 2, 20), s
    assert s["bytes_per_slice"] == {"normal": 80, "abnormal": 80, "concat": 0}, s
    assert s["index_bytes"]["concat"] == s["fixed_bytes"]["concat"] == 0, s
    model, _ = load_model(tiny_checkpoint)
    books = codebooks_of(model)
    for space in codebook.STORED:  # what does not grow with the slices: the codebooks, mostly
        empty = faiss.serialize_index(store.empty_index(space, "codebook", books))
        assert 0 <= s["fixed_bytes"][space] - len(empty) <= 64, (space, s["fixed_bytes"])
    result = invoke("index", "stats", "--index", dirs["codebook"])
    assert "codebook index" in result.output, result.output
    assert "normal: 8.0 MiB, 80 B per slice + 8.0 MiB of codebooks" in result.output
    assert "concat: no file, read from the normal and abnormal indices" in result.output
    assert stats(dirs["flat"])["kind"] == "flat"

    # The same patients got the same slice ids in both directories.
    snaps = {kind: snapshot(index) for kind, index in dirs.items()}
    assert snaps["flat"].slices == snaps["codebook"].slices
    ids = sorted(snaps["codebook"].ids())
    lesion = {r[0] for rows in snaps["codebook"].slices.values() for r in rows if r[2]}
    answers = {}
    for kind, index in dirs.items():
        with TestClient(create_app(Settings(index_dir=index))) as client:
            got = []
            for sid in ids[::3]:
                for space in SPACES:
                    got.append(_similar(client, sid, space=space, k=8))
                    got.append(_similar(client, sid, space=space, k=5, has_abnormality="true"))
                    got.append(_similar(client, sid, space=space, k=5, exclude_own_patient="false",
                                        group="patient"))
            png = client.get(f"/slices/{ids[4]}/image.png").content
            r = client.post(f"/search?space=concat&k=6&exclude_patient={c}",
                            files={"file": ("q.png", png, "image/png")})
            assert r.status_code == 200, r.text
            got.append([(h["slice_id"], h["distance"], h["patient_id"])
                        for h in r.json()["neighbors"]])
            answers[kind] = got
    assert any(answers["codebook"]) and all(
        {h[0] for h in hits} <= lesion for hits in answers["codebook"][1:-1:3])
    assert all(c != h[2] for h in answers["codebook"][-1]), "exclude_patient"
    for flat, cb in zip(answers["flat"], answers["codebook"], strict=True):
        assert [h[0] for h in cb] == [h[0] for h in flat], (flat, cb)
        np.testing.assert_allclose([h[1] for h in cb], [h[1] for h in flat], rtol=1e-5,
                                   atol=1e-5)


def test_verify_names_foreign_centroids_and_a_wrong_kind(encoded_pair, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(encoded_pair[0], index_dir)
    snap = snapshot(index_dir)
    path = store.faiss_path(index_dir, "abnormal", snap.generation)
    index = faiss.read_index(str(path))
    table = codebook.stored_centroids(faiss.downcast_index(index)).copy()
    table[:, 7] += 0.25  # code 7 of every position moved
    faiss.copy_array_to_vector(table.ravel(), faiss.downcast_index(index).pq.centroids)
    faiss.write_index(index, str(path))
    problems = verify(index_dir)
    assert "the abnormal index's centroids are not the checkpoint's codebooks" in problems
    # Beside it, only the vectors of slices that use code 7, in the two spaces that hold the
    # abnormal code: nothing of the normal index.
    others = [p for p in problems if "centroids" not in p]
    assert all(re.match(r"(abnormal|concat) index: \d+ vector\(s\) differ", p)
               for p in others), problems

    flat = store.empty_index("normal", "flat")
    faiss.write_index(flat, str(store.faiss_path(index_dir, "normal", snap.generation)))
    problems = verify(index_dir)
    assert "normal index is of kind flat, index.json records codebook" in problems, problems


def test_a_manifest_without_kind_is_flat_and_an_unknown_kind_is_refused(tmp_path):
    assert store.manifest_kind({"format": store.FORMAT}) == "flat"
    with pytest.raises(store.IndexStoreError, match="records kind 'ivf'"):
        store.manifest_kind({"kind": "ivf"})
    with pytest.raises(store.IndexStoreError, match="unknown index kind 'ivf'"):
        Indexer(tmp_path / "index").build([tmp_path], kind="ivf")
