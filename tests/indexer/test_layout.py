"""Vector layout v1: position-major code vectors, concat = normal then abnormal, and the
per-position distance decomposition the service explains results with."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.catalog import decode_codes, encode_codes
from indexer.layout import (
    CODE_DIM,
    DIMS,
    LAYOUT_VERSION,
    POSITIONS,
    SPACES,
    code_vectors,
    position_distances,
    space_vectors,
)

K = 7  # codebook entries


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def books(rng):
    # Distinct, recognisable rows: row k holds k + j / 100, so a mixed-up layout cannot pass.
    base = np.arange(K, dtype=np.float32)[:, None] + np.arange(CODE_DIM, dtype=np.float32) / 100
    return {"normal": base, "abnormal": rng.normal(size=(K + 3, CODE_DIM)).astype(np.float32)}


def test_layout_constants():
    assert LAYOUT_VERSION == 1
    assert SPACES == ("normal", "abnormal", "concat")
    assert (CODE_DIM, POSITIONS) == (64, 64)
    assert DIMS == {"normal": 4096, "abnormal": 4096, "concat": 8192}


def test_code_vectors_are_position_major(books, rng):
    book = books["normal"]
    idx = rng.integers(0, K, size=(3, 8, 8))
    vec = code_vectors(book, idx)
    assert vec.shape == (3, 4096), vec.shape
    assert vec.dtype == np.float32 and vec.flags.c_contiguous
    for b in range(3):
        for p in range(POSITIONS):
            r, c = divmod(p, 8)  # row-major over the 8 x 8 grid
            assert idx[b].flat[p] == idx[b, r, c]
            np.testing.assert_array_equal(
                vec[b, p * 64:(p + 1) * 64], book[idx[b].flat[p]],
                err_msg=f"slice {b}, position {p} ({r}, {c}) is not codebook[{idx[b, r, c]}]")


def test_code_vectors_hand_made_example():
    book = np.zeros((3, 64), np.float32)
    book[1] = 1.0
    book[2] = np.arange(64)
    idx = np.zeros((1, 8, 8), np.int64)
    idx[0, 0, 1] = 2  # position 1
    idx[0, 7, 7] = 1  # position 63
    vec = code_vectors(book, idx)[0]
    np.testing.assert_array_equal(vec[64:128], np.arange(64), err_msg="position (0, 1)")
    np.testing.assert_array_equal(vec[-64:], np.ones(64), err_msg="position (7, 7)")
    assert vec[:64].sum() == 0 and vec[128:-64].sum() == 0, "other positions hold codebook[0]"


def test_space_vectors_concat_is_normal_then_abnormal(books, rng):
    n_idx = rng.integers(0, K, size=(4, 8, 8))
    a_idx = rng.integers(0, K + 3, size=(4, 8, 8))
    out = space_vectors(books, n_idx, a_idx)
    assert set(out) == set(SPACES)
    for space in SPACES:
        assert out[space].shape == (4, DIMS[space]), (space, out[space].shape)
        assert out[space].dtype == np.float32
    np.testing.assert_array_equal(out["normal"], code_vectors(books["normal"], n_idx))
    np.testing.assert_array_equal(out["abnormal"], code_vectors(books["abnormal"], a_idx))
    np.testing.assert_array_equal(out["concat"][:, :4096], out["normal"], err_msg="concat head")
    np.testing.assert_array_equal(out["concat"][:, 4096:], out["abnormal"], err_msg="concat tail")
    only = space_vectors(books, n_idx, a_idx, spaces=("abnormal",))
    assert list(only) == ["abnormal"]
    np.testing.assert_array_equal(only["abnormal"], out["abnormal"])


@pytest.mark.parametrize("space", ["normal", "abnormal", "concat"])
def test_position_distances_sum_to_squared_l2(books, rng, space):
    n_idx = rng.integers(0, K, size=(2, 8, 8))
    a_idx = rng.integers(0, K + 3, size=(2, 8, 8))
    vecs = space_vectors(books, n_idx, a_idx)[space]
    q, o = vecs[0], vecs[1]
    per = position_distances(q, o)
    assert per.shape == (8, 8)
    assert (per >= 0).all()
    l2 = float(((q.astype(np.float64) - o) ** 2).sum())
    assert np.isclose(per.sum(), l2, rtol=1e-5), (space, per.sum(), l2)
    # Entry (r, c) is the distance of position r * 8 + c (both halves of it for concat).
    halves = q.reshape(-1, 64, 64), o.reshape(-1, 64, 64)
    for r, c in [(0, 0), (0, 1), (3, 5), (7, 7)]:
        p = r * 8 + c
        expect = sum(float(((halves[0][h, p] - halves[1][h, p]) ** 2).sum())
                     for h in range(halves[0].shape[0]))
        assert np.isclose(per[r, c], expect, rtol=1e-5), (space, r, c, per[r, c], expect)


def test_position_distances_of_identical_vectors_are_zero(books, rng):
    idx = rng.integers(0, K, size=(1, 8, 8))
    vec = code_vectors(books["normal"], idx)[0]
    assert not position_distances(vec, vec).any()


@pytest.mark.parametrize(("shape", "message"), [
    ((8, 8), r"code indices must be \(B, 8, 8\), got \(8, 8\)"),
    ((2, 8, 7), r"code indices must be \(B, 8, 8\), got \(2, 8, 7\)"),
    ((2, 64), r"code indices must be \(B, 8, 8\), got \(2, 64\)"),
    ((1, 1, 8, 8), r"code indices must be \(B, 8, 8\)"),
])
def test_bad_index_shapes_are_refused(books, shape, message):
    with pytest.raises(ValueError, match=message):
        code_vectors(books["normal"], np.zeros(shape, np.int64))


@pytest.mark.parametrize(("shape", "message"), [
    ((K, 32), r"codebook must be \(K, 64\), got \(7, 32\)"),
    ((64,), r"codebook must be \(K, 64\), got \(64,\)"),
    ((2, K, 64), r"codebook must be \(K, 64\)"),
])
def test_bad_codebook_shapes_are_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        code_vectors(np.zeros(shape, np.float32), np.zeros((1, 8, 8), np.int64))


@pytest.mark.parametrize("bad", [-1, K, K + 100])
def test_out_of_range_indices_are_refused(books, bad):
    idx = np.zeros((2, 8, 8), np.int64)
    idx[1, 4, 4] = bad
    with pytest.raises(ValueError, match=rf"code index outside 0\.\.{K - 1}"):
        code_vectors(books["normal"], idx)
    with pytest.raises(ValueError, match=r"code index outside"):
        space_vectors(books, idx, np.zeros((2, 8, 8), np.int64))


def test_empty_batch_gives_empty_vectors(books):
    vec = code_vectors(books["normal"], np.zeros((0, 8, 8), np.int64))
    assert vec.shape == (0, 4096)


def test_catalogue_code_blobs_round_trip(rng):
    idx = rng.integers(0, 65536, size=(8, 8))
    blob = encode_codes(idx)
    assert len(blob) == 128  # 64 little-endian uint16
    np.testing.assert_array_equal(decode_codes(blob), idx)
    assert decode_codes(encode_codes(np.full((8, 8), 513))).dtype == np.int64
    assert encode_codes(np.arange(64).reshape(8, 8))[:4] == b"\x00\x00\x01\x00"
    for bad in (np.zeros((4, 4)), np.full((8, 8), -1), np.full((8, 8), 65536)):
        with pytest.raises(ValueError, match=r"code indices must be \(8, 8\) in 0\.\.65535"):
            encode_codes(bad)
