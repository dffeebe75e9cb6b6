"""What a distance means in this index: its between-patient nearest-neighbour distances.

For a sample of indexed slices, the distance in each space to the nearest slice of *another*
patient: what a new patient's slice typically finds. A search hit's distance is then read
against that distribution: ``match_percentile`` is the share of those nearest-neighbour
distances that are at least as large (100 for a distance of 0, about 50 for a typical best
match, near 0 for a worse one), and a query whose best hit lies beyond every sampled
nearest-neighbour distance (``match_percentile`` 0) is flagged as lying far from everything
indexed: a new patient's slice is flagged so with a chance of about one in the sample size.

Like is compared with like: each sampled distance keeps whether its slice has a lesion, and a
query with a lesion is read against the sampled slices with one (a lesion-free query against
lesion-free ones). It matters in the abnormal space: most slices are lesion-free and share the
null code, so the median over all of them (1.95 in the demo index) made every lesion match read
0-1% (issue 22); lesions differ between patients far more than that. A group with fewer than
``MIN_GROUP`` sampled slices (an index of lesion-free patients, or without labels) falls back
to all of them.

The same pass names the index's example (``choose_example``), the slice the page's "Try an
example" searches with: the labelled lesion slice whose first page of abnormal-space results
holds the most lesions and lies nearest, so that a newcomer sees what a good match reads as
(issue 22: the page's earlier rule, the middle lesion slice of the patient with the most, read
4.7-10.5% on the demo index).

Measured when an index generation is written (``cbir index build``, ``add`` and ``remove``) and
stored beside its FAISS files (``store.reference_path``), with the codebooks it was measured
with; the service reads it when it loads that generation, and measures it itself only for an
index written before this file existed. Cheap because the codes are discrete: a squared
distance is a sum over the 64 code positions of the squared distance of two codebook rows, so
one (K, K) table per codebook turns each slice pair into 64 look-ups instead of a 4096- or
8192-d difference. The sample is every slice up to ``MAX_SAMPLE``, evenly spaced
beyond; the whole index is searched for each, ``COLUMNS`` slices at a time (at 10^6 slices and a
sample of 20: about 4 s and 51 MiB at the peak, where one block took 46 s and 1.6 GiB).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.layout import SPACES
from model.atomic import atomic_write

MAX_SAMPLE = 256
EXAMPLE_HITS = 5  # the first page of results an example is judged by
EXAMPLE_BLOCK = 1 << 22  # candidate x index distances held at once (32 MiB)
MIN_GROUP = 8  # sampled slices of a status below which percentiles are read against all
MAX_PAIRS = 20_000_000  # sample x index size: a few seconds of look-ups at most
COLUMNS = 1 << 16  # indexed slices whose distances to the sample are held at once


def _tolerance(distances: np.ndarray) -> float:
    """Rounding of a squared distance among sorted ``distances``: float32 FAISS distances of
    equal codes can differ from the float64 table by this much."""
    return 1e-6 * max(1.0, float(distances[-1]))


def codebook_tables(codebooks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Squared L2 distance between every two rows of each codebook: (K, K) float64, exactly 0
    between a row and itself (the expanded form leaves about 1e-13 there, which a median of
    slices sharing one code would read as their typical distance)."""
    tables = {}
    for name, book in codebooks.items():
        b = np.asarray(book, np.float64)
        sq = (b ** 2).sum(1)
        tables[name] = np.maximum(sq[:, None] + sq[None, :] - 2.0 * b @ b.T, 0.0)
        np.fill_diagonal(tables[name], 0.0)
    return tables


@dataclass(frozen=True)
class Reference:
    """Sorted between-patient nearest-neighbour distances per space, how many were sampled, and
    per distance whether its slice has a lesion (1, 0, or -1 unknown; all -1 for a reference
    stored before the status was)."""

    distances: dict[str, np.ndarray]
    sampled: int
    status: dict[str, np.ndarray] | None = None
    # The catalogue row (ascending slice id) of the abnormal-space example (``choose_example``);
    # -1 when the index has none (no labelled lesion slice), None when not measured.
    example: int | None = None

    @classmethod
    def measure(cls, codebooks: dict[str, np.ndarray], codes: np.ndarray,
                patients: np.ndarray, abnormal: np.ndarray | None = None) -> Reference | None:
        """``codes`` (N, 2, 8, 8): normal, abnormal code indices; ``patients`` (N,);
        ``abnormal`` (N,) 1, 0 or -1 per slice (the catalogue's has_abnormality). None when the
        index has fewer than two patients (no between-patient distance exists)."""
        n = len(codes)
        if n == 0 or len(np.unique(patients)) < 2:
            return None
        size = int(min(n, MAX_SAMPLE, max(16, MAX_PAIRS // n)))
        rows = np.unique(np.linspace(0, n - 1, size).round().astype(np.int64))
        tables = codebook_tables(codebooks)
        flat = np.asarray(codes).reshape(n, 2, 64)  # indexes as it is: no int64 copy
        sample = flat[rows]
        nearest = {space: np.full(len(rows), np.inf) for space in SPACES}
        # The index in column blocks: memory stays (sample x COLUMNS), whatever its size.
        for start in range(0, n, COLUMNS):
            block = flat[start:start + COLUMNS]
            per_code = []
            for c, name in enumerate(("normal", "abnormal")):
                d = np.zeros((len(rows), len(block)), np.float64)
                for p in range(64):  # the sampled slices' table rows, read at the block's codes
                    d += np.take(tables[name][sample[:, c, p]], block[:, c, p], axis=1)
                per_code.append(d)
            other = patients[rows][:, None] != patients[None, start:start + COLUMNS]
            for space, d in (("normal", per_code[0]), ("abnormal", per_code[1]),
                             ("concat", per_code[0] + per_code[1])):
                nearest[space] = np.minimum(nearest[space],
                                            np.where(other, d, np.inf).min(axis=1))
        flags = (np.asarray(abnormal, np.int8)[rows] if abnormal is not None
                 else np.full(len(rows), -1, np.int8))
        distances, status = {}, {}
        for space, d in nearest.items():
            keep = np.flatnonzero(np.isfinite(d))
            order = keep[np.argsort(d[keep], kind="stable")]
            distances[space], status[space] = d[order], flags[order]
        example = (-1 if abnormal is None else
                   choose_example(tables["abnormal"], flat[:, 1], patients, abnormal))
        return cls(distances=distances, sampled=len(rows), status=status, example=example)

    def save(self, path: Path, codebooks: dict[str, np.ndarray]) -> None:
        """Atomically, as .npz: the sorted distances per space, the sample size, and the
        codebooks they were measured with (``load`` refuses a file of other codebooks)."""
        buf = io.BytesIO()
        np.savez(buf, sampled=np.int64(self.sampled),
                 example=np.int64(-1 if self.example is None else self.example),
                 **{f"distances_{s}": self.distances[s] for s in SPACES},
                 **{f"status_{s}": self._status(s) for s in SPACES},
                 **{f"codebook_{n}": np.asarray(b, np.float32) for n, b in codebooks.items()})
        atomic_write(Path(path), lambda fh: fh.write(buf.getvalue()))

    @classmethod
    def load(cls, path: Path, codebooks: dict[str, np.ndarray]) -> Reference | None:
        """The reference stored at ``path``; None when there is none, it cannot be read, or it
        was measured with other codebooks than ``codebooks`` (then measure it again)."""
        try:
            with np.load(Path(path)) as f:
                for name, book in codebooks.items():
                    if not np.array_equal(f[f"codebook_{name}"], np.asarray(book, np.float32)):
                        return None
                return cls(distances={s: f[f"distances_{s}"].astype(np.float64)
                                      for s in SPACES},
                           sampled=int(f["sampled"]),
                           status={s: f[f"status_{s}"] for s in SPACES}
                           if all(f"status_{s}" in f for s in SPACES) else None,
                           example=int(f["example"]) if "example" in f else None)
        except (OSError, KeyError, ValueError):
            return None

    @staticmethod
    def stored_codebooks(path: Path) -> dict[str, np.ndarray] | None:
        """The codebooks a stored reference was measured with (None without a readable file):
        what ``cbir index remove``, which loads no model, measures the next one with."""
        try:
            with np.load(Path(path)) as f:
                return {n: f[f"codebook_{n}"] for n in ("normal", "abnormal")}
        except (OSError, KeyError, ValueError):
            return None

    def _status(self, space: str) -> np.ndarray:
        if self.status is None:
            return np.full(len(self.distances[space]), -1, np.int8)
        return np.asarray(self.status[space], np.int8)

    def group(self, space: str, lesion: bool | None = None) -> np.ndarray:
        """The sorted distances a query of this status is read against: the sampled slices with
        (``lesion`` True) or without (False) a lesion, all of them for None or a group smaller
        than ``MIN_GROUP``."""
        ref = self.distances[space]
        if lesion is None:
            return ref
        mine = ref[self._status(space) == int(lesion)]
        return mine if len(mine) >= MIN_GROUP else ref

    def median(self, space: str, lesion: bool | None = None) -> float:
        """The group's median; 0 when it lies within rounding of 0 (most of the group shares
        one code exactly, as lesion-free slices share the null code)."""
        ref = self.group(space, lesion)
        median = float(np.median(ref))
        return 0.0 if median <= _tolerance(ref) else median

    def match_percentile(self, space: str, distance: float, lesion: bool | None = None) -> float:
        """Share (0..100) of the sampled nearest-neighbour distances of the query's status
        (``group``) that are >= ``distance``."""
        ref = self.group(space, lesion)
        at_least = len(ref) - np.searchsorted(ref, distance - _tolerance(ref), side="left")
        return round(100.0 * at_least / len(ref), 1)

    def far(self, space: str, distance: float, lesion: bool | None = None) -> float | None:
        """How many times the median the distance is, when it lies beyond every sampled
        nearest-neighbour distance of the query's status; None otherwise."""
        if self.match_percentile(space, distance, lesion) > 0:
            return None
        median = self.median(space, lesion)
        return distance / median if median > 0 else float("inf")


def choose_example(table: np.ndarray, codes: np.ndarray, patients: np.ndarray,
                   abnormal: np.ndarray) -> int:
    """The index's example for the abnormal space: the row of the labelled lesion slice whose
    first page of results (its nearest slice in each of the ``EXAMPLE_HITS`` nearest other
    patients, as a search grouped by patient returns them) holds the most lesion slices and,
    among those, lies nearest: the smallest distance to the last of them, so every hit's match
    percentile is as high as this index allows. A query on the null code (a lesion too small to
    get a lesion code) is passed over while another exists: its hits tie at distance 0 with
    lesion-free slices. -1 when no slice is labelled with a lesion.

    ``table`` (K, K) the abnormal codebook's squared distances; ``codes`` (N, 64) abnormal code
    indices; ``patients``, ``abnormal`` (N,). The candidates are every lesion slice, evenly
    spaced down to ``MAX_PAIRS`` over the index size, read ``EXAMPLE_BLOCK`` distances at a
    time: as bounded as the reference's measurement."""
    lesion = np.flatnonzero(np.asarray(abnormal) == 1)
    n = len(codes)
    if not len(lesion):
        return -1
    budget = max(1, MAX_PAIRS // n)
    if len(lesion) > budget:
        lesion = lesion[np.unique(np.linspace(0, len(lesion) - 1, budget).round().astype(np.int64))]
    _, patient = np.unique(patients, return_inverse=True)
    order = np.argsort(patient, kind="stable")  # the index's rows, patient by patient
    starts = np.flatnonzero(np.r_[True, np.diff(patient[order]) != 0])
    ends = np.r_[starts[1:], n]
    hits = min(EXAMPLE_HITS, len(starts) - 1)
    if hits < 1:
        return -1
    flags = np.asarray(abnormal)[order] == 1
    columns = codes[order].astype(np.int64)
    best_key, best_row = None, -1
    chunk = max(1, EXAMPLE_BLOCK // n)
    for at in range(0, len(lesion), chunk):
        rows = lesion[at:at + chunk]
        d = np.zeros((len(rows), n))
        for p in range(codes.shape[1]):
            d += np.take(table[codes[rows, p].astype(np.int64)], columns[:, p], axis=1)
        per_patient = np.minimum.reduceat(d, starts, axis=1)  # (rows, patients)
        per_patient[np.arange(len(rows)), patient[rows]] = np.inf  # other patients only
        nearest = np.argsort(per_patient, axis=1, kind="stable")[:, :hits]
        for i, row in enumerate(rows):
            found = [starts[j] + int(np.argmin(d[i, starts[j]:ends[j]])) for j in nearest[i]]
            last = float(per_patient[i, nearest[i, -1]])
            null = last <= 1e-6 * max(1.0, last)  # 0 but for rounding: the hits' null code
            key = (null, -int(flags[found].sum()), last)
            if best_key is None or key < best_key:
                best_key, best_row = key, int(row)
    return best_row
