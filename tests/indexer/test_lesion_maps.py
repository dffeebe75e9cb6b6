"""The lesion maps the overlap compose ranks by (indexer/lesion_maps.py): decoded from the
stored abnormal codes, cached per distinct code in the index directory, filled by the writer."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from indexer.catalog import open_catalog, read_slice_arrays
from indexer.lesion_maps import (
    MAP_SIZE,
    LesionMaps,
    cache_path,
    decode_maps,
    lesion_term,
    soft_dice,
)
from model.checkpoint import load_model, read_checkpoint


@pytest.fixture(scope="module")
def indexed(phantom_index, phantom_checkpoint, tmp_path_factory):
    """A copy of the phantom index, its slices' abnormal codes, the model and its sha256."""
    from sqlalchemy.orm import Session

    from indexer import store

    index = tmp_path_factory.mktemp("maps") / "index"
    shutil.copytree(phantom_index, index)
    engine = open_catalog(store.default_db_url(index))
    with Session(engine) as session:
        codes = read_slice_arrays(session)["codes"][:, 1]
    engine.dispose()
    model, ckpt = load_model(phantom_checkpoint)
    return index, codes, model, read_checkpoint(phantom_checkpoint)["weights_sha256"]


def test_the_writer_fills_the_cache_with_every_distinct_code(indexed):
    index, codes, model, sha = indexed
    distinct = np.unique(codes.reshape(len(codes), -1), axis=0)
    with np.load(cache_path(index)) as f:
        assert str(f["weights_sha256"]) == sha
        cached = {k.tobytes(): m for k, m in zip(f["codes"], f["maps"], strict=True)}
        assert f["maps"].shape == (len(cached), MAP_SIZE * MAP_SIZE)
    assert len(cached) == len(distinct)
    expect = decode_maps(model, distinct.reshape(-1, 8, 8))
    got = np.stack([cached[k.astype(np.uint16).tobytes()] for k in distinct]).astype(np.float32)
    np.testing.assert_allclose(got, expect, atol=1e-3)  # float16 in the file
    assert ((expect >= 0) & (expect <= 1)).all()


def test_a_reader_uses_the_cache_without_the_model(indexed):
    index, codes, _, sha = indexed
    maps = LesionMaps.for_index(index, sha, codes, model=None)  # decoding would fail
    assert maps.of_rows(np.arange(len(codes))).shape == (len(codes), MAP_SIZE * MAP_SIZE)
    # slices that share a code share a map
    flat = codes.reshape(len(codes), -1)
    same = [(i, j) for i in range(len(flat)) for j in range(i) if (flat[i] == flat[j]).all()]
    for i, j in same:
        assert maps.rows[i] == maps.rows[j]


def test_other_weights_or_a_damaged_file_are_decoded_again(indexed, tmp_path, caplog):
    index, codes, model, sha = indexed
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    expect = LesionMaps.for_index(index, sha, codes, model=None).of_rows(np.arange(len(codes)))

    # another checkpoint's cache: ignored, and replaced by this one's
    got = LesionMaps.for_index(copy, "0" * 64, codes, model).of_rows(np.arange(len(codes)))
    np.testing.assert_allclose(got.astype(np.float32), expect.astype(np.float32), atol=1e-3)
    with np.load(cache_path(copy)) as f:
        assert str(f["weights_sha256"]) == "0" * 64

    cache_path(copy).write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="indexer.lesion_maps"):
        got = LesionMaps.for_index(copy, sha, codes, model).of_rows(np.arange(len(codes)))
    assert "unreadable" in caplog.text
    np.testing.assert_allclose(got.astype(np.float32), expect.astype(np.float32), atol=1e-3)
    with np.load(cache_path(copy)) as f:  # and written back whole
        assert str(f["weights_sha256"]) == sha


def test_a_failed_write_is_logged_and_the_maps_still_served(indexed, tmp_path, caplog):
    """The cache's place is taken by a directory: writing it fails, serving does not."""
    index, codes, model, _ = indexed
    copy = tmp_path / "index"
    copy.mkdir()
    cache_path(copy).mkdir()
    with caplog.at_level(logging.WARNING, logger="indexer.lesion_maps"):
        maps = LesionMaps.for_index(copy, "f" * 64, codes, model)
    assert "cannot write" in caplog.text
    assert maps.of_rows(np.arange(len(codes))).shape[0] == len(codes)


def test_soft_dice_and_the_lesion_term():
    a = np.zeros(MAP_SIZE * MAP_SIZE, np.float32)
    a[:100] = 1
    b = np.zeros_like(a)
    b[50:150] = 1
    got = soft_dice(a, np.stack([a, b, np.zeros_like(a)]))
    np.testing.assert_allclose(got, [1.0, 0.5, 0.0], atol=1e-6)
    term = lesion_term(a, b, 1.5)
    assert term.shape == (8, 8) and term.sum() == pytest.approx(1.5)
    # the cells where they differ carry it: map rows 0-1 (a only) and 3-4 (b only), that is
    # cell rows 0 and 1 (4 map rows each)
    assert term[0].sum() > 0 and term[1].sum() > 0 and term[2:].sum() == 0
    assert lesion_term(a, a, 0.8) == pytest.approx(np.full((8, 8), 0.8 / 64))
