"""The vector layout of the three spaces; one function builds stored and query vectors alike.

Layout version 1, fixed: a code (64, 8, 8) becomes a 4096-d float32 vector in position-major
order: the 64 values of position (0, 0), then of (0, 1), ... then (7, 7). Row-major over the
8 x 8 grid, channel fastest. ``concat`` is the normal vector followed by the abnormal vector
(8192-d). Position-major keeps each position's 64 values together, so the squared L2 distance is
a sum of 64 per-position terms (``position_distances``), and a product quantizer with M = 64
sub-vectors of 64 dims maps one sub-quantizer to one position (the roadmap's compressed index).
"""

from __future__ import annotations

import numpy as np

LAYOUT_VERSION = 1
SPACES = ("normal", "abnormal", "concat")
CODE_DIM = 64
POSITIONS = 64  # 8 x 8
DIMS = {"normal": CODE_DIM * POSITIONS, "abnormal": CODE_DIM * POSITIONS,
        "concat": 2 * CODE_DIM * POSITIONS}


def code_vectors(codebook: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Code indices (B, 8, 8) and their codebook (K, 64) -> (B, 4096) float32, layout v1."""
    idx = np.asarray(indices)
    if idx.ndim != 3 or idx.shape[1:] != (8, 8):
        raise ValueError(f"code indices must be (B, 8, 8), got {idx.shape}")
    book = np.asarray(codebook, dtype=np.float32)
    if book.ndim != 2 or book.shape[1] != CODE_DIM:
        raise ValueError(f"codebook must be (K, {CODE_DIM}), got {book.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= book.shape[0]):
        raise ValueError(f"code index outside 0..{book.shape[0] - 1}")
    # (B, 8, 8) -> (B, 8, 8, 64) -> (B, 4096): position-major, channel fastest.
    return np.ascontiguousarray(book[idx].reshape(idx.shape[0], POSITIONS * CODE_DIM))


def space_vectors(codebooks: dict[str, np.ndarray], normal_idx: np.ndarray,
                  abnormal_idx: np.ndarray, spaces=SPACES) -> dict[str, np.ndarray]:
    """The vectors of each requested space for a batch of slices (or of a composed query)."""
    out: dict[str, np.ndarray] = {}
    need_normal = "normal" in spaces or "concat" in spaces
    need_abnormal = "abnormal" in spaces or "concat" in spaces
    normal = code_vectors(codebooks["normal"], normal_idx) if need_normal else None
    abnormal = code_vectors(codebooks["abnormal"], abnormal_idx) if need_abnormal else None
    if "normal" in spaces:
        out["normal"] = normal
    if "abnormal" in spaces:
        out["abnormal"] = abnormal
    if "concat" in spaces:
        out["concat"] = np.ascontiguousarray(np.concatenate([normal, abnormal], axis=1))
    return out


def position_distances(query: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per-position squared distances (8, 8) of two vectors of one space; they sum to the L2^2.

    For ``concat`` the normal and abnormal terms of a position are added.
    """
    q = np.asarray(query, np.float32).reshape(-1, POSITIONS, CODE_DIM)
    o = np.asarray(other, np.float32).reshape(-1, POSITIONS, CODE_DIM)
    return ((q - o) ** 2).sum(axis=(0, 2)).reshape(8, 8)
