"""The ``codebook`` kind of index: an exact product quantizer whose sub-quantizers are codebooks.

PAPER-NOTES, "Retrieval arithmetic": every position of a quantized code is one of the K codebook
vectors, so in the position-major layout (``indexer.layout``) a product quantizer with one 64-d
sub-quantizer per position, each holding the space's codebook as its centroids, stores every
vector exactly as its 64 code indices (9 bits each for K = 512: 72 bytes instead of 16 KiB), and
its distance (query sub-vector to centroid, summed over positions) is the flat index's L2^2.
``concat`` has 128 sub-quantizers: the 64 normal positions, then the 64 abnormal ones.

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

import faiss
import numpy as np

from indexer.layout import CODE_DIM, DIMS, POSITIONS

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


def decode(index: faiss.IndexIVFPQ, ids: np.ndarray) -> np.ndarray:
    """The stored vectors (codebook lookups) of slice ``ids``, (len(ids), d).

    KeyError names an id the index does not hold."""
    ids = np.asarray(ids, np.int64)
    held, codes = stored(index)
    order = np.argsort(held)
    at = np.minimum(np.searchsorted(held[order], ids), max(len(held) - 1, 0))
    found = held[order[at]] == ids if len(held) else np.zeros(len(ids), bool)
    if not found.all():
        raise KeyError(f"slice id {int(ids[~found][0])} is not in the index")
    if not len(ids):
        return np.zeros((0, index.d), np.float32)
    return index.sa_decode(codes[order[at]])
