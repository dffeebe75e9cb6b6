"""Where each indexed slice's lesion lies, as the model's segmentation decoder reads it from the
stored abnormal code: a 32 x 32 map of lesion probability (1 - p(background), averaged over
8 x 8 pixel blocks of the 256 x 256 slice). The default composed query (``Retrieval.compose``,
weighting ``overlap``) ranks by the anatomy half's distance and by how well a slice's map
overlaps the lesion donor's.

A map depends on the abnormal code alone, and lesion-free slices mostly share one code (the
null code), so maps are kept per distinct code: ``INDEX_DIR/lesion-maps.npz`` holds the codes
(U, 64) uint16, their maps (U, 1024) float16 and the weights' sha256 that drew them. It is a
cache: ``cbir index build/add`` fills it for the codes they wrote, a reader decodes the codes
it lacks (an index written before it existed) and writes it back when it can, and a file of
other weights is ignored and replaced. About 2 KB per distinct code.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.atomic import atomic_write

log = logging.getLogger(__name__)

FILE_NAME = "lesion-maps.npz"
MAP_SIZE = 32  # cells per side
BATCH = 64


def cache_path(index_dir: Path) -> Path:
    return Path(index_dir) / FILE_NAME


@torch.inference_mode()
def decode_maps(model, codes: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """(U, 8, 8) abnormal code indices -> (U, MAP_SIZE * MAP_SIZE) float32 lesion probability."""
    out = np.empty((len(codes), MAP_SIZE * MAP_SIZE), np.float32)
    for start in range(0, len(codes), BATCH):
        idx = torch.from_numpy(np.asarray(codes[start:start + BATCH], np.int64)).to(device)
        logits = model.segment(model.abnormal_quantizer.lookup(idx)).float()  # (B, 4, S, S)
        lesion = 1.0 - logits.softmax(1)[:, :1]
        pooled = F.adaptive_avg_pool2d(lesion, MAP_SIZE)
        out[start:start + len(idx)] = pooled.reshape(len(idx), -1).cpu().numpy()
    return out


def soft_dice(query: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Soft Dice of one (M,) map against (n, M) maps, each in [0, 1]; 0 where both are empty."""
    query = np.asarray(query, np.float32)
    maps = np.asarray(maps, np.float32)
    inter = maps @ query
    return 2.0 * inter / np.maximum(maps.sum(1) + query.sum(), 1e-6)


def lesion_term(donor: np.ndarray, other: np.ndarray, term: float) -> np.ndarray:
    """(8, 8): ``term`` (an overlap compose's lesion part of a distance) spread over the code
    positions by where the two maps differ, evenly where they do not differ at all."""
    cells = MAP_SIZE // 8
    diff = np.abs(np.asarray(donor, np.float64) - np.asarray(other, np.float64))
    diff = diff.reshape(8, cells, 8, cells).sum((1, 3))
    total = diff.sum()
    return term * (diff / total if total > 0 else np.full((8, 8), 1 / 64))


class LesionMaps:
    """The maps of one generation's slices: ``maps[rows[i]]`` is slice row i's."""

    def __init__(self, maps: np.ndarray, rows: np.ndarray):
        self.maps = np.asarray(maps, np.float32)  # (U, M): one per distinct code, 4 KB each
        self.rows = rows  # (N,) int64

    def of_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.maps[self.rows[rows]]

    def overlap(self, donor: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Soft Dice of the donor's map against the maps of slice ``rows``: computed once per
        distinct code, then looked up per slice."""
        return soft_dice(donor, self.maps)[self.rows[rows]]

    @classmethod
    def for_index(cls, index_dir: Path, weights_sha256: str, abnormal: np.ndarray, model,
                  device: torch.device | str = "cpu", write: bool = True) -> LesionMaps:
        """The maps of ``abnormal`` (N, 8, 8) codes: read from the index's cache, the missing
        ones decoded with ``model`` (and the cache rewritten with them when ``write``; a cache
        that cannot be written is only logged: a read-only index still serves)."""
        flat = np.ascontiguousarray(np.asarray(abnormal).reshape(len(abnormal), -1), np.uint16)
        keys, rows = (np.unique(flat, axis=0, return_inverse=True) if len(flat)
                      else (np.zeros((0, 64), np.uint16), np.zeros(0, np.int64)))
        rows = np.asarray(rows, np.int64).reshape(-1)
        known_keys, known_maps = _read(cache_path(index_dir), weights_sha256)
        maps = np.zeros((len(keys), MAP_SIZE * MAP_SIZE), np.float16)
        have = np.zeros(len(keys), bool)
        if len(known_keys):
            where = {k.tobytes(): i for i, k in enumerate(known_keys)}
            for i, key in enumerate(keys):
                j = where.get(key.tobytes())
                if j is not None:
                    maps[i], have[i] = known_maps[j], True
        missing = np.flatnonzero(~have)
        if missing.size:
            clock = time.perf_counter()
            maps[missing] = decode_maps(model, keys[missing].reshape(-1, 8, 8), device)
            log.info("lesion maps: decoded %d of %d distinct abnormal codes in %.1f s",
                     missing.size, len(keys), time.perf_counter() - clock)
            if write:
                all_keys = np.concatenate([known_keys, keys[missing]])
                all_maps = np.concatenate([known_maps, maps[missing]])
                try:
                    _write(cache_path(index_dir), weights_sha256, all_keys, all_maps)
                except OSError as exc:
                    log.warning("lesion maps: cannot write %s (%s); they are decoded again at "
                                "the next start", cache_path(index_dir), exc)
        return cls(maps, rows)


def _read(path: Path, weights_sha256: str) -> tuple[np.ndarray, np.ndarray]:
    empty = (np.zeros((0, 64), np.uint16), np.zeros((0, MAP_SIZE * MAP_SIZE), np.float16))
    try:
        with np.load(path) as f:
            if str(f["weights_sha256"]) != weights_sha256:
                return empty
            keys, maps = f["codes"], f["maps"]
    except FileNotFoundError:
        return empty
    except (OSError, ValueError, KeyError) as exc:  # a damaged cache is decoded again
        log.warning("lesion maps: ignoring unreadable %s (%s)", path, exc)
        return empty
    if keys.ndim != 2 or keys.shape[1] != 64 or maps.shape != (len(keys), MAP_SIZE * MAP_SIZE):
        log.warning("lesion maps: ignoring %s of unexpected shape", path)
        return empty
    return keys.astype(np.uint16), maps.astype(np.float16)


def _write(path: Path, weights_sha256: str, keys: np.ndarray, maps: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, weights_sha256=np.array(weights_sha256), codes=keys.astype(np.uint16),
             maps=maps.astype(np.float16))
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()))
