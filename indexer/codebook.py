"""The ``codebook`` kind of index: an exact product quantizer whose sub-quantizers are codebooks.

PAPER-NOTES, "Retrieval arithmetic": every position of a quantized code is one of the K codebook
vectors, so in the position-major layout (``indexer.layout``) a product quantizer with one 64-d
sub-quantizer per position, each holding the space's codebook as its centroids, stores every
vector exactly as its 64 code indices (9 bits each for K = 512: 72 bytes instead of 16 KiB), and
its distance (query sub-vector to centroid, summed over positions) is the flat index's L2^2.

Only ``normal`` and ``abnormal`` are stored. A ``concat`` code is the normal code followed by the
abnormal one and its L2^2 is the sum of theirs, so ``ConcatScan`` reads it from those two
indices instead of holding a third copy of every code, which took half the memory (README, "cbir
bench search"). A ``concat`` file an index directory written before holds is no longer read.
``make_index`` still makes a stored concat index, which the tests compare ``ConcatScan`` with.

FAISS holds it as an ``IndexIVFPQ`` with one inverted list and ``by_residual`` off rather than an
``IndexPQ``: the same codes, the same distance table and scan, but ``IndexPQ`` refuses an
``IDSelector`` (IndexPQ.cpp: "selector not supported", facebookresearch/faiss#3559) and the
service filters inside the search. The list keeps the slice ids itself (8 bytes each), in
increasing order: adds append larger ids, and ``remove_ids`` here keeps the order (FAISS's own
moves the last entry into each hole), so equal distances are resolved by id as in the flat index.

Codes are packed from the model's code indices (FAISS's PQ bit layout: index m fills bits
``nbits * m`` to ``nbits * (m + 1) - 1`` of the code, least significant first), never by
PQ-encoding float vectors. FAISS has no GPU version of this index (no GPU ``IndexPQ``; its GPU
IVFPQ packs at most 8 bits per code): it is searched on the CPU.
"""

from __future__ import annotations

import numpy as np

from indexer.faiss_lib import faiss
from indexer.layout import CODE_DIM, DIMS, POSITIONS

STORED = ("normal", "abnormal")  # the spaces stored; concat is read from both (``ConcatScan``)
PARTS = {"normal": ("normal",), "abnormal": ("abnormal",), "concat": ("normal", "abnormal")}


def nbits(codebook_size: int) -> int:
    """Bits per code index: 9 for K = 512."""
    return max(1, (int(codebook_size) - 1).bit_length())


def centroids(space: str, codebooks: dict[str, np.ndarray]) -> np.ndarray:
    """(M, 2**nbits, 64) float32: sub-quantizer m holds the codebook of the part position m belongs
    to. A codebook of fewer than 2**nbits vectors is padded with zero rows no code refers to."""
    books = [np.asarray(codebooks[part], np.float32) for part in PARTS[space]]
    size = books[0].shape[0]
    for book in books:
        if book.shape != (size, CODE_DIM):
            raise ValueError(f"codebooks must be ({size}, {CODE_DIM}), got {book.shape}")
    ksub = 2 ** nbits(size)
    out = np.zeros((len(books) * POSITIONS, ksub, CODE_DIM), np.float32)
    for p, book in enumerate(books):
        out[p * POSITIONS:(p + 1) * POSITIONS, :size] = book
    return out


def make_index(space: str, codebooks: dict[str, np.ndarray]) -> faiss.IndexIVFPQ:
    """An empty codebook index of ``space``, trained by construction (no k-means)."""
    table = centroids(space, codebooks)
    m, ksub, _ = table.shape
    coarse = faiss.IndexFlatL2(DIMS[space])
    coarse.add(np.zeros((1, DIMS[space]), np.float32))  # one list: every slice is scanned
    index = faiss.IndexIVFPQ(coarse, DIMS[space], 1, m, ksub.bit_length() - 1)
    index.by_residual = False
    faiss.copy_array_to_vector(table.ravel(), index.pq.centroids)
    index.is_trained = True
    return index


def pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """(B, P) code indices -> (B, P * bits / 8) uint8 PQ codes."""
    idx = np.asarray(indices)
    if idx.ndim != 2:
        raise ValueError(f"code indices must be (B, P), got {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= 2 ** bits):
        raise ValueError(f"code index outside 0..{2 ** bits - 1}")
    planes = (idx.astype(np.uint16)[..., None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(len(idx), -1), axis=1, bitorder="little")


def unpack(codes: np.ndarray, positions: int, bits: int) -> np.ndarray:
    """(B, code bytes) uint8 PQ codes -> (B, positions) int64 code indices; inverse of ``pack``."""
    planes = np.unpackbits(np.asarray(codes, np.uint8), axis=1, bitorder="little")
    planes = planes[:, :positions * bits].reshape(len(codes), positions, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=2)


def space_codes(normal_idx: np.ndarray, abnormal_idx: np.ndarray, bits: int,
                spaces=tuple(PARTS)) -> dict[str, np.ndarray]:
    """The PQ codes of each space for a batch of slices, from code indices (B, 8, 8) each.

    Row-major over the 8 x 8 grid is the layout's position order. 64 codes fill whole bytes, so a
    concat code is the normal code followed by the abnormal code."""
    parts = {"normal": normal_idx, "abnormal": abnormal_idx}
    packed = {part: pack(np.asarray(parts[part]).reshape(len(parts[part]), POSITIONS), bits)
              for part in {p for s in spaces for p in PARTS[s]}}
    return {s: np.ascontiguousarray(np.concatenate([packed[p] for p in PARTS[s]], axis=1))
            for s in spaces}


def bits_of(index: faiss.IndexIVFPQ) -> int:
    return int(index.pq.nbits)


def stored_centroids(index: faiss.IndexIVFPQ) -> np.ndarray:
    """(M, 2**nbits, 64): the centroids the index searches with."""
    pq = index.pq
    return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def stored(index: faiss.IndexIVFPQ) -> tuple[np.ndarray, np.ndarray]:
    """Copies of the slice ids (N,) and PQ codes (N, code bytes), in scan order."""
    lists = index.invlists
    n = lists.list_size(0)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, index.code_size), np.uint8)
    ids = faiss.rev_swig_ptr(lists.get_ids(0), n).copy()
    codes = faiss.rev_swig_ptr(lists.get_codes(0), n * index.code_size).copy()
    return ids.astype(np.int64), codes.reshape(n, index.code_size)


def add(index: faiss.IndexIVFPQ, codes: np.ndarray, ids: np.ndarray) -> None:
    index.add_sa_codes(np.ascontiguousarray(codes, np.uint8),
                       np.ascontiguousarray(ids, np.int64))


def remove_ids(index: faiss.IndexIVFPQ, ids: np.ndarray) -> int:
    """Remove slices by id, keeping the others in scan order. Returns how many were removed."""
    held, codes = stored(index)
    keep = ~np.isin(held, np.asarray(ids, np.int64))
    removed = int((~keep).sum())
    if removed:
        index.reset()
        add(index, codes[keep], held[keep])
    return removed


def decode_chunks(index: faiss.IndexIVFPQ, ids: np.ndarray, chunk: int):
    """The stored vectors (codebook lookups) of slice ``ids``, ``chunk`` ids at a time, as
    (ids, (n, d) vectors) pairs: one copy of the codes
    (72 B a slice) is held, and one chunk of 16 KiB vectors. KeyError names an id the index
    does not hold, before anything is yielded."""
    ids = np.asarray(ids, np.int64)
    held, codes = stored(index)
    order = np.argsort(held)
    at = np.minimum(np.searchsorted(held[order], ids), max(len(held) - 1, 0))
    found = held[order[at]] == ids if len(held) else np.zeros(len(ids), bool)
    if not found.all():
        raise KeyError(f"slice id {int(ids[~found][0])} is not in the index")
    for start in range(0, len(ids), chunk):
        part = slice(start, start + chunk)
        yield ids[part], index.sa_decode(codes[order[at[part]]])


# -- concat, read from the normal and abnormal indices -------------------------------------------

SCAN_CHUNK = 1 << 20  # slices whose distances a concat query holds at once (48 MiB measured)
_FAR = np.finfo(np.float32).max  # what FAISS reports for a neighbour it could not fill


def _ids_view(index: faiss.IndexIVFPQ) -> np.ndarray:
    """The slice ids the index holds, in scan order, as a view of FAISS's memory (no copy)."""
    lists = faiss.downcast_index(index).invlists
    n = lists.list_size(0)
    return faiss.rev_swig_ptr(lists.get_ids(0), n) if n else np.zeros(0, np.int64)


def _nearest(distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest distances, ties broken by the smaller id, in order."""
    if len(distances) > k:
        keep = distances <= np.partition(distances, k - 1)[k - 1]
        distances, ids = distances[keep], ids[keep]
    order = np.lexsort((ids, distances))[:k]
    return distances[order], ids[order]


class ConcatScan:
    """The ``concat`` space of a codebook index, searched through its normal and abnormal indices.

    For each query, both parts are scanned in ranges of ``SCAN_CHUNK`` slice ids for every
    slice's distance (FAISS ``range_search`` with an infinite radius, the filter's selector
    applied inside the scan); a slice's concat distance is the sum of its two, exactly as
    a 128-position scan adds the same terms; the k smallest are kept, ties by id. It costs the two
    scans a stored concat index would cost in one, and at most ``SCAN_CHUNK`` distances and ids
    of each part at a time. It answers ``search`` as a FAISS index does, and stores nothing:
    adding or removing slices is done on the two parts."""

    def __init__(self, normal: faiss.Index, abnormal: faiss.Index):
        # The objects given, not ``faiss.downcast_index`` copies: a copy does not own the C++
        # index, which the given object frees when it is collected.
        self.normal, self.abnormal = normal, abnormal
        self.d = normal.d + abnormal.d

    @property
    def ntotal(self) -> int:
        return self.normal.ntotal

    def search(self, x: np.ndarray, k: int, params: faiss.SearchParameters | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k) distances and ids, padded as FAISS pads (id -1) when fewer slices pass."""
        x = np.ascontiguousarray(x, np.float32).reshape(-1, self.d)
        out_d = np.full((len(x), k), _FAR, np.float32)
        out_i = np.full((len(x), k), -1, np.int64)
        selector = None if params is None else params.sel
        for q, query in enumerate(x):
            d, i = self._search_one(query, k, selector)
            out_d[q, :len(d)], out_i[q, :len(i)] = d, i
        return out_d, out_i

    def _ranges(self) -> list[tuple[int, int] | None]:
        ids = _ids_view(self.normal)
        if len(ids) <= SCAN_CHUNK:
            return [None]  # one scan, no range selector
        edges = np.unique(np.append(ids[::SCAN_CHUNK], ids.max() + 1))
        edges[0] = min(edges[0], ids.min())  # scan order is id order; hold even if it were not
        return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))

    def _search_one(self, query: np.ndarray, k: int, selector: faiss.IDSelector | None):
        qn = np.ascontiguousarray(query[None, :self.normal.d])
        qa = np.ascontiguousarray(query[None, self.normal.d:])
        best_d, best_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
        for bounds in self._ranges():
            sel = selector
            if bounds is not None:
                chunk = faiss.IDSelectorRange(*bounds)
                sel = chunk if selector is None else faiss.IDSelectorAnd(chunk, selector)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=1) if sel is not None else None
            _, dn, id_n = self.normal.range_search(qn, np.inf, params=params)
            _, da, id_a = self.abnormal.range_search(qa, np.inf, params=params)
            if not np.array_equal(id_n, id_a):  # both lists are kept in id order; align anyway
                on, oa = np.argsort(id_n), np.argsort(id_a)
                if not np.array_equal(id_n[on], id_a[oa]):
                    raise ValueError("the normal and abnormal indices hold different slice ids")
                dn, da, id_n = dn[on], da[oa], id_n[on]
            best_d, best_i = _nearest(np.concatenate([best_d, dn + da]),
                                      np.concatenate([best_i, id_n]), k)
        return best_d, best_i
