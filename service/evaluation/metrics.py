"""The figures of ``cbir eval``, on plain arrays: label Dice of a query against every reference,
what k neighbours score, the oracle, the bootstrap interval, and image fidelity in a region.

Every retrieval figure is the mean, over a query's k neighbours, of a per-pair score (a Dice, or
1 for a neighbour of the wanted kind). Scores are computed once per query against EVERY reference
slice, as a (Q, N) matrix; a method's neighbours only pick columns from it. So the oracle (the k
best columns of each row) is at least every method's value by construction, and a random method's
expected value is the row mean, with no sampling noise.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

SSIM_WINDOW = 11  # Wang et al. (2004): 11 x 11 Gaussian window, sigma 1.5 (as model/metrics.py)
_HALF = SSIM_WINDOW // 2
_CHUNK_BYTES = 1 << 25  # bound on the (Q, n, words) intersection words held at once (32 MiB)


def label_crop(*stacks: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns outside which every label map of every stack is 0. Cropping to them
    leaves every Dice unchanged and saves the products over the empty border."""
    any_label = np.zeros(stacks[0].shape[-2:], bool)
    for stack in stacks:
        any_label |= (stack > 0).any(axis=0)
    rows, cols = np.flatnonzero(any_label.any(1)), np.flatnonzero(any_label.any(0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def dice_matrix(query: np.ndarray, refs: np.ndarray, label: int | None = None) -> np.ndarray:
    """Dice of each query mask with each reference mask: (Q, H, W), (N, H, W) -> (Q, N).

    The mask is ``labels == label``, or ``labels > 0`` when ``label`` is None. Pixel-exact:
    masks are packed 64 pixels to a word and intersections counted with popcount (64 query
    against 2,300 reference masks of 216 x 196 pixels: 0.29 s, where a float32 matrix product
    of the 0/1 masks took 0.79 s on the same 2-core CPU). NaN where neither mask has a pixel.
    """
    rows, cols = label_crop(query, refs)
    q, r = _bits(query[:, rows, cols], label), _bits(refs[:, rows, cols], label)
    sq = np.bitwise_count(q).sum(axis=1, dtype=np.int64)
    sr = np.bitwise_count(r).sum(axis=1, dtype=np.int64)
    inter = np.empty((len(q), len(r)), np.int64)
    chunk = max(1, _CHUNK_BYTES // max(1, q.nbytes))  # references per step
    for start in range(0, len(r), chunk):
        both = q[:, None, :] & r[None, start:start + chunk, :]  # (Q, n, words)
        inter[:, start:start + chunk] = np.bitwise_count(both).sum(axis=2, dtype=np.int64)
    total = sq[:, None] + sr[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * inter / total, np.nan).astype(np.float32)


def _bits(labels: np.ndarray, label: int | None) -> np.ndarray:
    """(n, H, W) label maps -> (n, words) uint64 masks, 64 pixels per word."""
    m = labels > 0 if label is None else labels == label
    packed = np.packbits(m.reshape(len(labels), -1), axis=1)
    pad = -packed.shape[1] % 8
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)


def mean_label_dice(query: np.ndarray, refs: np.ndarray, labels: list[int]) -> np.ndarray:
    """(Q, N): the mean Dice over ``labels``, each label counted where either slice has it.

    Two slices with none of the labels agree perfectly: 1.
    """
    total = np.zeros((len(query), len(refs)), np.float32)
    count = np.zeros((len(query), len(refs)), np.int16)
    for label in labels:
        d = dice_matrix(query, refs, label)
        present = ~np.isnan(d)
        total += np.where(present, d, 0)
        count += present
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), 1.0).astype(np.float32)


def neighbour_mean(scores: np.ndarray, neighbours: np.ndarray, k: int) -> np.ndarray:
    """Per query, the mean score of its first k neighbours: (Q, N), (Q, >= k) rows -> (Q,)."""
    if neighbours.shape[1] < k:
        raise ValueError(f"{neighbours.shape[1]} neighbours per query, fewer than k = {k}")
    return np.take_along_axis(scores, neighbours[:, :k], axis=1).mean(axis=1)


def oracle_mean(scores: np.ndarray, k: int) -> np.ndarray:
    """Per query, the mean of its k best scores: what the best possible k neighbours score."""
    if scores.shape[1] < k:
        raise ValueError(f"{scores.shape[1]} references, fewer than k = {k}")
    return -np.partition(-scores, k - 1, axis=1)[:, :k].mean(axis=1)


def random_mean(scores: np.ndarray) -> np.ndarray:
    """Per query, the expected mean score of k neighbours drawn uniformly (any k): the row mean."""
    return scores.mean(axis=1)


def shared_share(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per query, the share of the top-k of ``a`` that the top-k of ``b`` also holds:
    (Q, >= k), (Q, >= k) -> (Q,)."""
    a, b = a[:, :k], b[:, :k]
    return (a[:, :, None] == b[:, None, :]).any(axis=2).mean(axis=1)


def bootstrap_interval(values: np.ndarray, groups: np.ndarray, rng: np.random.Generator,
                       draws: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``values``, resampling whole groups
    (query patients) with replacement, since slices of one patient are not independent."""
    values = np.asarray(values, np.float64)
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    picks = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=draws)  # (draws, P)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (picks @ sums) / (picks @ counts)
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def region_mae(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float | None:
    """Mean |a - b| over ``region`` (H, W); None for an empty region."""
    if not region.any():
        return None
    return float(np.abs(a[region] - b[region]).mean())


def ssim_maps(a: np.ndarray, b: np.ndarray, batch: int = 16) -> np.ndarray:
    """Local SSIM of two stacks of [0, 1] slices, (n, H, W) each -> (n, H - 10, W - 10): one
    value per window that fits in the image, at its centre."""
    out = []
    for start in range(0, len(a), batch):
        x = torch.from_numpy(np.ascontiguousarray(a[start:start + batch], np.float32))[:, None]
        y = torch.from_numpy(np.ascontiguousarray(b[start:start + batch], np.float32))[:, None]
        s, _ = compute_ssim_and_cs(x, y, spatial_dims=2, kernel_size=(SSIM_WINDOW,) * 2,
                                   kernel_sigma=(1.5, 1.5), data_range=1.0)
        out.append(s[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(
        n - 2 * _HALF for n in a.shape[1:]), np.float32)


def region_ssim(ssim_map: np.ndarray, region: np.ndarray) -> float | None:
    """Mean of one slice's local SSIM (``ssim_maps``) over the window centres inside ``region``
    (H, W); None when no such centre is in the region."""
    r = region[_HALF:-_HALF, _HALF:-_HALF]
    return float(ssim_map[r].mean()) if r.any() else None


def class_dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float | None:
    """Dice of one class between two label maps; None where neither has it."""
    p, t = pred == label, truth == label
    total = int(p.sum()) + int(t.sum())
    return None if total == 0 else 2 * int((p & t).sum()) / total
