"""The evaluation's metrics on hand-built label maps with known answers, and the vectorised
Dice matrix against a plain per-pair loop."""

from __future__ import annotations

import numpy as np
import pytest

from service.evaluation import metrics


def square(size: int = 16, rows=slice(4, 8), cols=slice(4, 8), label: int = 1) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[rows, cols] = label
    return m


def test_dice_of_identical_disjoint_and_half_overlapping_masks():
    a = square()  # 16 pixels
    disjoint = square(rows=slice(10, 14))
    half = square(cols=slice(6, 10))  # shares 8 of its 16 pixels with a
    d = metrics.dice_matrix(a[None], np.stack([a, disjoint, half]))
    np.testing.assert_allclose(d, [[1.0, 0.0, 0.5]])


def test_dice_of_two_empty_masks_is_undefined_and_of_one_empty_mask_zero():
    empty = np.zeros((16, 16), np.uint8)
    d = metrics.dice_matrix(np.stack([empty, square()]), np.stack([empty, square()]))
    assert np.isnan(d[0, 0])
    assert d[0, 1] == 0 and d[1, 0] == 0 and d[1, 1] == 1


def test_dice_of_one_label_ignores_the_others():
    q = square(label=2)
    r = square(label=3)
    assert metrics.dice_matrix(q[None], r[None])[0, 0] == 1.0  # whole mask: labels > 0
    assert metrics.dice_matrix(q[None], r[None], label=2)[0, 0] == 0.0
    assert np.isnan(metrics.dice_matrix(q[None], r[None], label=1)[0, 0])


@pytest.mark.parametrize("chunk_bytes", [1 << 25, 64])
def test_dice_matrix_equals_a_plain_loop_over_pairs(monkeypatch, chunk_bytes):
    monkeypatch.setattr(metrics, "_CHUNK_BYTES", chunk_bytes)  # one step, or many small ones
    rng = np.random.default_rng(0)
    query = rng.integers(0, 4, (5, 40, 40)).astype(np.uint8)
    refs = rng.integers(0, 4, (300, 40, 40)).astype(np.uint8)
    refs[:, :3] = 0  # an empty border the crop removes
    query[:, :3] = 0
    for label in (None, 1, 3):
        fast = metrics.dice_matrix(query, refs, label)
        for i in range(len(query)):
            for j in range(0, len(refs), 37):
                q = query[i] > 0 if label is None else query[i] == label
                r = refs[j] > 0 if label is None else refs[j] == label
                assert fast[i, j] == pytest.approx(2 * (q & r).sum() / (q.sum() + r.sum()),
                                                   abs=1e-6)


def test_mean_label_dice_counts_labels_either_slice_has():
    q = square(label=1) + square(rows=slice(10, 14), label=2)
    r = square(label=1) + square(rows=slice(10, 14), cols=slice(6, 10), label=2)
    # label 1: Dice 1; label 2: Dice 0.5; labels 3..6 absent from both: not counted.
    d = metrics.mean_label_dice(q[None], r[None], labels=[1, 2, 3, 4, 5, 6])
    assert d[0, 0] == pytest.approx(0.75)
    only_q = square(rows=slice(10, 14), label=3)
    d = metrics.mean_label_dice((q + only_q)[None], r[None], labels=[1, 2, 3])
    assert d[0, 0] == pytest.approx((1 + 0.5 + 0) / 3)
    empty = np.zeros((1, 16, 16), np.uint8)
    assert metrics.mean_label_dice(empty, empty, labels=[1, 2])[0, 0] == 1.0


def test_neighbour_mean_oracle_and_random():
    scores = np.array([[0.1, 0.9, 0.5, 0.7]], np.float32)
    neighbours = np.array([[1, 3, 0]])
    assert metrics.neighbour_mean(scores, neighbours, 1)[0] == pytest.approx(0.9)
    assert metrics.neighbour_mean(scores, neighbours, 3)[0] == pytest.approx((0.9 + 0.7 + 0.1) / 3)
    assert metrics.oracle_mean(scores, 1)[0] == pytest.approx(0.9)
    assert metrics.oracle_mean(scores, 2)[0] == pytest.approx(0.8)
    assert metrics.random_mean(scores)[0] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="fewer than k"):
        metrics.neighbour_mean(scores, neighbours, 4)
    with pytest.raises(ValueError, match="fewer than k"):
        metrics.oracle_mean(scores, 5)


def test_oracle_is_at_least_any_ranking():
    rng = np.random.default_rng(1)
    scores = rng.random((20, 50)).astype(np.float32)
    for k in (1, 5, 50):
        oracle = metrics.oracle_mean(scores, k)
        for _ in range(20):
            picks = np.stack([rng.permutation(50) for _ in range(20)])
            assert (metrics.neighbour_mean(scores, picks, k) <= oracle + 1e-6).all()
    # The oracle at k is the mean of the k largest scores, exactly.
    np.testing.assert_allclose(metrics.oracle_mean(scores, 5),
                               np.sort(scores, axis=1)[:, -5:].mean(axis=1), rtol=1e-6)


def test_precision_at_k_is_the_share_of_neighbours_with_a_lesion():
    has_lesion = np.array([1, 0, 1, 1, 0], np.float32)[None]  # one query, five references
    neighbours = np.array([[0, 1, 2, 4, 3]])
    assert metrics.neighbour_mean(has_lesion, neighbours, 1)[0] == 1.0
    assert metrics.neighbour_mean(has_lesion, neighbours, 2)[0] == 0.5
    assert metrics.neighbour_mean(has_lesion, neighbours, 4)[0] == 0.5
    assert metrics.oracle_mean(has_lesion, 3)[0] == 1.0
    assert metrics.oracle_mean(has_lesion, 4)[0] == 0.75


def test_shared_share():
    a = np.array([[1, 2, 3], [5, 6, 7]])
    b = np.array([[3, 4, 1], [5, 6, 7]])
    np.testing.assert_allclose(metrics.shared_share(a, b, 3), [2 / 3, 1.0])
    np.testing.assert_allclose(metrics.shared_share(a, b, 1), [0.0, 1.0])


def test_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(0)
    # One patient: every resample is that patient, so the interval is its mean exactly.
    lo, hi = metrics.bootstrap_interval(np.array([0.2, 0.4, 0.9]), np.array(["a"] * 3), rng)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # Patient a (10 slices, all 0) and b (1 slice, 1): a resample's mean is 0, 1/11 or 1.
    values = np.array([0.0] * 10 + [1.0])
    groups = np.array(["a"] * 10 + ["b"])
    lo, hi = metrics.bootstrap_interval(values, groups, rng, draws=2000)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    lo, hi = metrics.bootstrap_interval(values, groups, rng, draws=2000, level=0.4)
    assert lo == pytest.approx(1 / 11) and hi == pytest.approx(1 / 11)


def test_region_mae_and_ssim():
    a = np.zeros((32, 32), np.float32)
    b = np.full((32, 32), 0.25, np.float32)
    region = np.zeros((32, 32), bool)
    region[8:24, 8:24] = True
    assert metrics.region_mae(a, b, region) == pytest.approx(0.25)
    assert metrics.region_mae(a, b, np.zeros_like(region)) is None
    img = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    same, inverted = metrics.ssim_maps(img, img), metrics.ssim_maps(img, 1 - img, batch=2)
    assert same.shape == inverted.shape == (3, 22, 22)
    assert metrics.region_ssim(same[1], region) == pytest.approx(1.0, abs=1e-5)
    assert metrics.region_ssim(inverted[2], region) < 0
    # Batched maps equal one-at-a-time maps.
    np.testing.assert_allclose(inverted[2], metrics.ssim_maps(img[2:], 1 - img[2:])[0],
                               atol=1e-6)
    border = np.zeros_like(region)
    border[0, :] = True  # no window centre fits there
    assert metrics.region_ssim(same[0], border) is None


def test_class_dice():
    pred = square(label=2)
    truth = square(cols=slice(6, 10), label=2)
    assert metrics.class_dice(pred, truth, 2) == pytest.approx(0.5)
    assert metrics.class_dice(pred, truth, 1) is None
    assert metrics.class_dice(pred, np.zeros_like(truth), 2) == 0.0
