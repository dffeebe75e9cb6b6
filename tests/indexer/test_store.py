"""The index store: stored thumbnails (what the loader workers write is what the service reads
back), and one writer at a time."""

import numpy as np
import pytest

from indexer import store


def test_thumbnails_round_trip_with_and_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    slice_index = np.array([40, 41, 97], dtype=np.int64)
    image = rng.integers(0, 256, size=(3, 256, 256), dtype=np.uint8)
    labels = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=(3, 256, 256))
    for pid, lab in ((1, labels), (2, None)):
        store.write_thumbnails(tmp_path, pid, store.thumbnails_npz(slice_index, image, lab))
        back = store.read_thumbnails(tmp_path, pid)
        assert sorted(back) == (["image", "labels", "slice_index"] if lab is not None
                                else ["image", "slice_index"])
        np.testing.assert_array_equal(back["slice_index"], slice_index)
        np.testing.assert_array_equal(back["image"], image)
        if lab is not None:
            np.testing.assert_array_equal(back["labels"], labels)
            assert back["labels"].dtype == np.uint8


def test_thumbnails_are_compressed():
    image = np.zeros((4, 256, 256), dtype=np.uint8)
    image[:, 64:192, 64:192] = 128
    npz = store.thumbnails_npz(np.arange(4), image, None)
    assert len(npz) < image.nbytes / 20


def test_a_second_writer_is_refused_at_once_and_the_first_frees_the_lock(tmp_path):
    busy = pytest.raises(store.IndexStoreError, match="another build/add/remove is running")
    with store.writer_lock(tmp_path), busy, store.writer_lock(tmp_path):
        pass
    with store.writer_lock(tmp_path):  # released by the first
        pass
    with pytest.raises(RuntimeError, match="inside"), store.writer_lock(tmp_path):
        raise RuntimeError("inside")  # an error inside frees it too
    with store.writer_lock(tmp_path):
        pass
