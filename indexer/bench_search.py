"""``cbir bench search``: the flat and the codebook kinds of index side by side at archive scale.

Slices are synthetic codes drawn from a checkpoint's codebooks (the shipped one by default), with
some of an archive's structure: patients of 150 consecutive slice ids whose slices share most of
a per-patient normal code, and lesions in a band of slices of 60 % of patients, their abnormal
code null outside a few lesion positions (the code ``--null-code`` training gives lesion-free
positions). Queries are slices of other synthetic patients. Per size, space and kind the index is
built from code indices as ``cbir index`` builds it (float vectors added to ``IndexFlatL2``, or
packed codes to the codebook index), measured, and freed before the next, so its resident memory
is its own. The codebook kind's ``concat`` is read from a normal and an abnormal index
(``codebook.ConcatScan``): its row builds and holds those two, and the kind's total counts them
once. A flat index that would not fit in the memory allowed is not built, and the table
says so. Figures are measured, never asserted; they depend on the machine and its load.

Filters are the service's two, as FAISS selectors built once per query (exclude_patient: every
slice but one patient's; has_abnormality: a bitmap over slice ids, kept per index).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from indexer import codebook, store
from indexer.faiss_lib import faiss
from indexer.layout import DIMS, POSITIONS, SPACES, code_vectors

SLICES_PER_PATIENT = 150
FILTERS = ("none", "exclude_patient", "has_abnormality")
CHUNK = 1 << 16  # slices generated and added at a time
FLAT_CHUNK = 1 << 13  # slices turned into float vectors at a time (128 or 256 MiB)
K_NEIGHBOURS = 10


@dataclass
class Measured:
    """One index: one size, space and kind."""

    size: int
    space: str
    kind: str
    skipped: str | None = None  # why it was not built
    build_s: float = 0.0
    bytes_per_slice: int = 0  # store.slice_bytes: what each slice adds to the file
    resident_mib: float = 0.0  # growth of the process's resident memory while building it
    query_peak_mib: float = 0.0  # the peak resident memory single queries add above that
    reads_parts: bool = False  # a codebook concat: its memory is the normal and abnormal indices'
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # one query at a time
    cpu_ms: dict[str, float] = field(default_factory=dict)  # process CPU per single query
    batch_qps: dict[str, float] = field(default_factory=dict)  # queries/s in batches
    same_as_flat: tuple[int, int] | None = None  # (queries whose top-10 ids equal flat's, of)

    def p(self, name: str, q: float) -> float:
        return float(np.percentile(self.latency_ms[name], q))


# -- synthetic codes ---------------------------------------------------------------------------


def _hash(*parts: np.ndarray) -> np.ndarray:
    """A cheap deterministic integer hash (splitmix64 finaliser) of broadcast uint64 arrays."""
    h = np.uint64(0x9E3779B97F4A7C15)
    for part in parts:
        h = (h ^ np.asarray(part, np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
    return h


def synthetic_codes(first: int, count: int, codebook_size: int, null_code: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Code indices of slice ids ``first .. first + count - 1``: normal (count, 64), abnormal
    (count, 64) uint16, and the lesion flags; the same ids give the same codes."""
    with np.errstate(over="ignore"):
        ids = np.arange(first, first + count, dtype=np.uint64)
        patient = ids // np.uint64(SLICES_PER_PATIENT)
        slice_no = (ids % np.uint64(SLICES_PER_PATIENT)).astype(np.int64)
        pos = np.arange(POSITIONS, dtype=np.uint64)
        s = np.uint64(seed)
        # Normal: the patient's code, a quarter of the positions redrawn per slice.
        base = _hash(s, patient[:, None], pos) % np.uint64(codebook_size)
        redraw = _hash(s, ids[:, None], pos, np.uint64(1))
        mixed = np.where(redraw % np.uint64(4) == 0, (redraw >> np.uint64(8))
                         % np.uint64(codebook_size), base)
        # Abnormal: 60 % of patients have a lesion in a band of 20 to 59 slices.
        ph = _hash(s, patient, np.uint64(2))
        band_start = (ph % np.uint64(60)).astype(np.int64) + 30
        band = ((ph >> np.uint64(8)) % np.uint64(40)).astype(np.int64) + 20
        lesion = ((ph >> np.uint64(16)) % np.uint64(10) < 6) & (slice_no >= band_start) & (
            slice_no < band_start + band)
        ah = _hash(s, ids[:, None], pos, np.uint64(3))
        at = lesion[:, None] & (ah % np.uint64(5) == 0)  # a fifth of the positions
        other = (ah >> np.uint64(8)) % np.uint64(codebook_size - 1)
        other = np.where(other >= null_code, other + np.uint64(1), other)  # never the null one
        abnormal = np.where(at, other, np.uint64(null_code))
    return mixed.astype(np.uint16), abnormal.astype(np.uint16), lesion


def _chunks(size: int, books, null_code: int, seed: int) -> Iterator[tuple]:
    for first in range(0, size, CHUNK):
        yield first, *synthetic_codes(first, min(CHUNK, size - first), len(books["normal"]),
                                      null_code, seed)


def _space_vectors(books, space: str, normal: np.ndarray, abnormal: np.ndarray) -> np.ndarray:
    grid = lambda idx: idx.astype(np.int64).reshape(len(idx), 8, 8)  # noqa: E731
    parts = {"normal": lambda: code_vectors(books["normal"], grid(normal)),
             "abnormal": lambda: code_vectors(books["abnormal"], grid(abnormal))}
    if space != "concat":
        return parts[space]()
    return np.ascontiguousarray(np.concatenate([parts["normal"](), parts["abnormal"]()], axis=1))


# -- memory ------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident bytes of this process, after handing freed heap back to the system."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: freed heap may stay counted
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Start the kernel's peak-resident count (VmHWM) afresh; False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _kib_field(path: str, name: str) -> int:
    """Bytes of a ``name: N kB`` line of a /proc file."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {name} in {path}")


def peak_bytes() -> int:
    return _kib_field("/proc/self/status", "VmHWM")


def available_bytes() -> int:
    return _kib_field("/proc/meminfo", "MemAvailable")


def flat_bytes(size: int, space: str) -> int:
    """What a flat index of ``size`` slices holds in memory: the vectors, the ids, and the
    IndexIDMap2's reverse map (a hash map, about 64 bytes an entry), plus one chunk of vectors
    being added."""
    return size * (4 * DIMS[space] + 8 + 64) + FLAT_CHUNK * 4 * DIMS[space]


# -- one index ---------------------------------------------------------------------------------


def _build(kind: str, space: str, size: int, books, null_code: int, seed: int):
    """The index and its lesion bitmap (bit i: slice id i has a lesion), and the seconds spent
    turning code indices into the index (code generation excluded). A codebook concat is built
    as the service holds it: a normal and an abnormal index, read together."""
    if kind == "codebook" and space == "concat":
        normal, lesion_bits, normal_s = _build(kind, "normal", size, books, null_code, seed)
        abnormal, _, abnormal_s = _build(kind, "abnormal", size, books, null_code, seed)
        return codebook.ConcatScan(normal, abnormal), lesion_bits, normal_s + abnormal_s
    index = store.empty_index(space, kind, books)
    lesion_bits = np.zeros((size + 7) // 8, np.uint8)
    seconds = 0.0
    bits = codebook.nbits(len(books["normal"]))
    for first, normal, abnormal, lesion in _chunks(size, books, null_code, seed):
        ids = np.arange(first, first + len(normal), dtype=np.int64)
        flags = np.zeros(((len(lesion) + 7) // 8) * 8, bool)
        flags[:len(lesion)] = lesion
        lesion_bits[first // 8:first // 8 + len(flags) // 8] = np.packbits(flags,
                                                                           bitorder="little")
        start = time.perf_counter()
        if kind == "flat":
            for at in range(0, len(ids), FLAT_CHUNK):
                part = slice(at, at + FLAT_CHUNK)
                index.add_with_ids(_space_vectors(books, space, normal[part], abnormal[part]),
                                   ids[part])
        else:
            grid = lambda idx: idx.reshape(len(idx), 8, 8)  # noqa: E731
            codes = codebook.space_codes(grid(normal), grid(abnormal), bits, spaces=(space,))
            codebook.add(index, codes[space], ids)
        seconds += time.perf_counter() - start
    return index, lesion_bits, seconds


def _selector(name: str, patient: int, lesion_bits: np.ndarray, size: int):
    if name == "exclude_patient":
        lo = patient * SLICES_PER_PATIENT
        return faiss.IDSelectorNot(faiss.IDSelectorRange(lo, min(lo + SLICES_PER_PATIENT, size)))
    return faiss.IDSelectorBitmap(lesion_bits)  # has_abnormality=true


def _search(index, queries: np.ndarray, name: str, patients: np.ndarray, lesion_bits,
            size: int):
    if name == "none":
        return index.search(queries, K_NEIGHBOURS)
    if name == "has_abnormality":  # one selector for every query: one FAISS call
        params = store.search_parameters(index, _selector(name, 0, lesion_bits, size))
        return index.search(queries, K_NEIGHBOURS, params=params)
    # exclude_patient names each query's own patient: one FAISS call per query.
    out_d, out_i = [], []
    for q, patient in zip(queries, patients, strict=True):
        sel = _selector(name, int(patient), lesion_bits, size)
        d, i = index.search(q[None], K_NEIGHBOURS, params=store.search_parameters(index, sel))
        out_d.append(d)
        out_i.append(i)
    return np.concatenate(out_d), np.concatenate(out_i)


def _measure(index, m: Measured, queries: np.ndarray, patients: np.ndarray, lesion_bits,
             n_queries: int, batch: int, budget_s: float) -> np.ndarray:
    """Single-query latency (up to ``n_queries``, at least 5, within ``budget_s``) and batched
    throughput (at least one batch) per filter. Returns the unfiltered top-10 ids of the
    single queries."""
    top = np.zeros((0, K_NEIGHBOURS), np.int64)
    base = rss_bytes()
    peak_known = reset_peak()
    for name in FILTERS:
        index.search(queries[:1], K_NEIGHBOURS)  # warm-up: first calls allocate
        times, cpu, ids = [], 0.0, []
        started = time.perf_counter()
        for i in range(n_queries):
            if i >= 5 and time.perf_counter() - started > budget_s:
                break
            c0, t0 = time.process_time(), time.perf_counter()
            _, got = _search(index, queries[i:i + 1], name, patients[i:i + 1], lesion_bits,
                             m.size)
            times.append((time.perf_counter() - t0) * 1000)
            cpu += (time.process_time() - c0) * 1000
            ids.append(got[0])
        m.latency_ms[name] = times
        m.cpu_ms[name] = cpu / len(times)
        if peak_known:
            m.query_peak_mib = max(m.query_peak_mib, (peak_bytes() - base) / 2**20)
        if name == "none":
            top = np.stack(ids)
        done, started = 0, time.perf_counter()
        while done == 0 or (time.perf_counter() - started < budget_s and done < 4 * batch):
            _search(index, queries[:batch], name, patients[:batch], lesion_bits, m.size)
            done += batch
        m.batch_qps[name] = done / (time.perf_counter() - started)
    return top


def run(sizes: list[int], spaces: list[str], checkpoint: Path, kinds=store.KINDS,
        n_queries: int = 50, batch: int = 16, budget_s: float = 5.0, threads: int = 1,
        memory_bytes: int | None = None, seed: int = 0,
        log: Callable[[str], None] = print) -> list[Measured]:
    """Every (size, space, kind) in that order; flat before codebook, so that the codebook row
    can say whether its top-10 equals flat's."""
    from model.checkpoint import load_model

    model, ckpt = load_model(checkpoint, torch.device("cpu"))
    books = {"normal": model.normal_quantizer.codebook.detach().numpy().copy(),
             "abnormal": model.abnormal_quantizer.codebook.detach().numpy().copy()}
    del model
    null_code = int(np.argmin((books["abnormal"] ** 2).sum(1)))
    faiss.omp_set_num_threads(threads)
    memory_bytes = memory_bytes or int(0.8 * available_bytes())
    log(f"codebooks of {checkpoint.name} ({ckpt['preset']}, K={len(books['normal'])}, null "
        f"abnormal code {null_code}); FAISS {faiss.__version__}, {threads} thread(s), "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; flat built only "
        f"within {memory_bytes / 2**30:.1f} GiB")
    results = []
    for size in sizes:
        for space in spaces:
            # Queries: one slice from each of as many synthetic patients after the indexed ones.
            picked = [synthetic_codes(size + (i + 1) * SLICES_PER_PATIENT + (i * 37) % 150, 1,
                                      len(books["normal"]), null_code, seed)
                      for i in range(max(n_queries, batch))]
            queries = _space_vectors(books, space, np.concatenate([p[0] for p in picked]),
                                     np.concatenate([p[1] for p in picked]))
            patients = np.random.default_rng(seed).integers(0, size // SLICES_PER_PATIENT,
                                                            len(queries))
            flat_top = None
            for kind in kinds:
                m = Measured(size=size, space=space, kind=kind)
                if kind == "flat" and (need := flat_bytes(size, space)) > memory_bytes:
                    m.skipped = (f"needs about {need / 2**30:.1f} GiB, {memory_bytes / 2**30:.1f}"
                                 f" GiB allowed")
                    log(f"{size:>10,} {space:8s} {kind:8s} not built: {m.skipped}")
                    results.append(m)
                    continue
                before = rss_bytes()
                index, lesion_bits, m.build_s = _build(kind, space, size, books, null_code, seed)
                m.resident_mib = (rss_bytes() - before) / 2**20
                m.bytes_per_slice = store.slice_bytes(index)
                m.reads_parts = isinstance(index, codebook.ConcatScan)
                top = _measure(index, m, queries, patients, lesion_bits, n_queries, batch,
                               budget_s)
                if kind == "flat":
                    flat_top = top
                elif flat_top is not None:
                    n = min(len(top), len(flat_top))
                    m.same_as_flat = (int((top[:n] == flat_top[:n]).all(1).sum()), n)
                del index, lesion_bits
                log(f"{size:>10,} {space:8s} {kind:8s} built in {m.build_s:.1f} s, "
                    f"{m.resident_mib:.0f} MiB, p50 {m.p('none', 50):.2f} ms")
                results.append(m)
    return results


# -- the table ---------------------------------------------------------------------------------


def table(results: list[Measured]) -> list[str]:
    """A Markdown table, one row per index, and the lines that summarise it."""
    head = ["slices", "space", "kind", "build s", "B/slice", "resident MiB", "query peak MiB",
            "p50 / p95 ms", "excl. patient p50 / p95", "lesion only p50 / p95",
            "CPU ms/query", "batch q/s: none / excl. / lesion", "top-10 = flat"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results:
        cells = [f"{m.size:,}", m.space, m.kind]
        if m.skipped:
            cells += [f"not run: {m.skipped}"] + [""] * (len(head) - 4)
        else:
            cells += [f"{m.build_s:.1f}",
                      "normal + abnormal" if m.reads_parts else f"{m.bytes_per_slice:,}",
                      f"{m.resident_mib:,.0f}", f"{m.query_peak_mib:,.0f}",
                      *(f"{m.p(f, 50):.2f} / {m.p(f, 95):.2f}" for f in FILTERS),
                      f"{m.cpu_ms['none']:.2f}",
                      " / ".join(f"{m.batch_qps[f]:,.1f}" for f in FILTERS),
                      "" if m.same_as_flat is None else
                      f"{m.same_as_flat[0]} of {m.same_as_flat[1]}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    built = [m for m in results if not m.skipped]
    for size in sorted({m.size for m in results}):
        cb = [m for m in built if m.size == size and m.kind == "codebook"]
        if cb:
            # A concat row holds a normal and an abnormal index: what all three spaces need.
            scan = next((m for m in cb if m.reads_parts), None)
            total = scan.resident_mib if scan else sum(m.resident_mib for m in cb)
            note = " (concat reads the normal and abnormal indices)" if scan else ""
            lines.append(f"codebook kind at {size:,} slices: {total:,.0f} MiB resident for "
                         f"{', '.join(m.space for m in cb)}{note}")
        for m in cb:
            flat = next((f for f in built if (f.size, f.space, f.kind) == (size, m.space, "flat")),
                        None)
            if flat:
                lines.append(
                    f"  {m.space}: one query at a time p50 "
                    f"{flat.p('none', 50) / m.p('none', 50):.1f}x faster than flat and "
                    f"{flat.cpu_ms['none'] / m.cpu_ms['none']:.1f}x less CPU; batches at "
                    f"{m.batch_qps['none'] / flat.batch_qps['none']:.2f}x flat's rate")
    for space in sorted({m.space for m in built}, key=SPACES.index):
        for kind in store.KINDS:
            rows = sorted((m for m in built if (m.space, m.kind) == (space, kind)),
                          key=lambda m: m.size)
            for a, b in zip(rows, rows[1:], strict=False):
                lines.append(f"{kind} {space}: {a.size:,} -> {b.size:,} slices "
                             f"({b.size / a.size:.0f}x): p50 {a.p('none', 50):.2f} -> "
                             f"{b.p('none', 50):.2f} ms "
                             f"({b.p('none', 50) / a.p('none', 50):.1f}x), "
                             f"CPU {a.cpu_ms['none']:.2f} -> {b.cpu_ms['none']:.2f} ms "
                             f"({b.cpu_ms['none'] / a.cpu_ms['none']:.1f}x)")
    return lines
