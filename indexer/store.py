"""An index directory: the FAISS indices of each generation, slice thumbnails, a catalogue.

    INDEX_DIR/
      index.json                  format, kind, catalogue URL (when not the default), checkpoint
      catalog.sqlite              the default catalogue (SQLite)
      faiss/<space>-<gen>.faiss   the indices keyed by slice id, of the directory's kind:
                                  flat      one per space, IndexIDMap2(IndexFlatL2), the float
                                            vectors
                                  codebook  normal and abnormal, the codes as an exact product
                                            quantizer; concat is read from those two
                                            (``indexer.codebook``)
      faiss/reference-<gen>.npz   between-patient nearest-neighbour distances (indexer/reference.py)
      slices/<patient id>.npz     the patient's indexed slices as 8-bit images and label maps
      lesion-maps.npz             a cache: the lesion map of each distinct abnormal code
                                  (indexer/lesion_maps.py), for the overlap compose
      .lock                       held by the one writer

How a change stays crash-safe: every change (build, add, remove) writes a NEW generation of the
index files (temporary name, fsync, ``os.replace``) and the new patients' thumbnails
before it touches the catalogue. Then ONE catalogue transaction inserts or deletes the rows and
flips ``index_builds.status = 'active'`` to the new generation: that commit is the switch. A
crash before it leaves the previous generation active with its rows; a crash after it leaves the
new one complete. Files no active generation or patient refers to are removed by the next writer.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from indexer import codebook
from indexer.faiss_lib import faiss
from indexer.layout import DIMS, SPACES, space_vectors
from model.atomic import atomic_write, exclusive_lock

FORMAT = "compositional-cbir/index"
FAISS_DIR = "faiss"
SLICES_DIR = "slices"
# A generation's files: its FAISS indices and its reference distances (indexer/reference.py).
_FAISS_NAME = re.compile(r"^(normal|abnormal|concat|reference)-(\d+)\.(faiss|npz)$")
KINDS = ("flat", "codebook")
DEFAULT_KIND = "flat"


class IndexStoreError(ValueError):
    """An index directory that cannot be used as asked; the message says why."""


def default_db_url(index_dir: Path) -> str:
    return f"sqlite:///{(Path(index_dir) / 'catalog.sqlite').resolve()}"


def read_manifest(index_dir: Path) -> dict:
    path = Path(index_dir) / "index.json"
    if not path.is_file():
        raise IndexStoreError(f"{index_dir}: not an index directory (no index.json); "
                          f"build one with `cbir index build`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise IndexStoreError(f"{path}: not a compositional-cbir index manifest")
    return manifest


def manifest_kind(manifest: dict) -> str:
    """The kind of index a directory holds; manifests written before kinds existed are flat."""
    kind = manifest.get("kind", DEFAULT_KIND)
    if kind not in KINDS:
        raise IndexStoreError(f"index.json records kind {kind!r}; this code knows "
                              f"{', '.join(KINDS)}")
    return kind


def write_manifest(index_dir: Path, manifest: dict) -> None:
    data = json.dumps({"format": FORMAT, **manifest}, indent=2).encode()
    atomic_write(Path(index_dir) / "index.json", lambda fh: fh.write(data))


@contextmanager
def writer_lock(index_dir: Path) -> Iterator[None]:
    """One writer per index directory; a second one fails at once with a clear message."""
    with exclusive_lock(Path(index_dir) / ".lock", lambda: IndexStoreError(
            f"{index_dir}: another build/add/remove is running")):
        yield


def faiss_path(index_dir: Path, space: str, generation: int) -> Path:
    return Path(index_dir) / FAISS_DIR / f"{space}-{generation:06d}.faiss"


def reference_path(index_dir: Path, generation: int) -> Path:
    """The generation's between-patient nearest-neighbour distances (indexer/reference.py)."""
    return Path(index_dir) / FAISS_DIR / f"reference-{generation:06d}.npz"


def generation_paths(index_dir: Path, generation: int) -> list[Path]:
    """Every file a generation may hold: its FAISS indices (no concat file in a codebook index),
    and its reference distances (absent with fewer than two patients, and in generations written
    before they existed)."""
    return [*(faiss_path(index_dir, s, generation) for s in SPACES),
            reference_path(index_dir, generation)]


def empty_index(space: str, kind: str = DEFAULT_KIND,
                codebooks: dict[str, np.ndarray] | None = None) -> faiss.Index:
    """An empty index of one space that stores its vectors (not a codebook kind's concat, which
    ``empty_indices`` reads from the other two); the codebook kind needs the model's codebooks."""
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatL2(DIMS[space]))
    if kind == "codebook":
        if codebooks is None:
            raise ValueError("a codebook index needs the model's codebooks")
        return codebook.make_index(space, codebooks)
    raise ValueError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}")


def empty_indices(kind: str = DEFAULT_KIND,
                  codebooks: dict[str, np.ndarray] | None = None) -> dict[str, faiss.Index]:
    """The three spaces' empty indices of a new generation."""
    if kind != "codebook":
        return {space: empty_index(space, kind, codebooks) for space in SPACES}
    out = {space: empty_index(space, kind, codebooks) for space in codebook.STORED}
    return {**out, "concat": codebook.ConcatScan(out["normal"], out["abnormal"])}


def _stored(indices: dict[str, faiss.Index]) -> dict[str, faiss.Index]:
    """The indices that hold vectors of their own (all but a ``ConcatScan``)."""
    return {s: i for s, i in indices.items() if not isinstance(i, codebook.ConcatScan)}


def index_kind(index: faiss.Index) -> str:
    """``flat`` or ``codebook``, from the FAISS types the index is made of."""
    if isinstance(index, codebook.ConcatScan):
        return "codebook"
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVFPQ) and index.nlist == 1 and not index.by_residual:
        return "codebook"
    if isinstance(index, faiss.IndexIDMap2) and isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlatL2):
        return "flat"
    return type(index).__name__


def add_slices(indices: dict[str, faiss.Index], codebooks: dict[str, np.ndarray],
               normal_idx: np.ndarray, abnormal_idx: np.ndarray, ids: np.ndarray) -> None:
    """Add slices, given by their code indices (B, 8, 8), to a generation's indices of one kind."""
    kinds = {index_kind(indices[s]) for s in SPACES}
    if kinds == {"flat"}:
        vectors = space_vectors(codebooks, normal_idx, abnormal_idx)
        for space in SPACES:
            indices[space].add_with_ids(vectors[space], ids)
    elif kinds == {"codebook"}:
        stored = _stored(indices)
        codes = codebook.space_codes(normal_idx, abnormal_idx,
                                     codebook.bits_of(indices["normal"]), spaces=tuple(stored))
        for space, index in stored.items():
            codebook.add(index, codes[space], ids)
    else:
        raise IndexStoreError(f"indices of mixed or unknown kinds: {sorted(kinds)}")


def remove_slices(indices: dict[str, faiss.Index], ids: np.ndarray) -> int:
    """Remove slices by id from a generation's indices, keeping the order of the others.
    Returns how many were removed from each space's index ({space: count})."""
    ids = np.ascontiguousarray(ids, np.int64)
    removed = {}
    for space, index in _stored(indices).items():
        if index_kind(index) == "codebook":
            removed[space] = codebook.remove_ids(faiss.downcast_index(index), ids)
        else:
            removed[space] = index.remove_ids(faiss.IDSelectorBatch(ids))
    return removed


def stored_vectors(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The vectors an index holds for slice ``ids``, (len(ids), d)."""
    parts = [vectors for _, vectors in stored_vector_chunks(index, ids, max(len(ids), 1))]
    return parts[0] if parts else np.zeros((0, index.d), np.float32)


def stored_vector_chunks(index: faiss.Index, ids: np.ndarray, chunk: int):
    """``stored_vectors`` of ``chunk`` ids at a time, as (ids, vectors) pairs, so that checking
    every slice of a large index holds one chunk of float vectors, not all of them (16 KiB a
    slice and space)."""
    ids = np.asarray(ids, np.int64)
    if isinstance(index, codebook.ConcatScan):
        for (part, normal), (_, abnormal) in zip(
                stored_vector_chunks(index.normal, ids, chunk),
                stored_vector_chunks(index.abnormal, ids, chunk), strict=True):
            yield part, np.concatenate([normal, abnormal], axis=1)
    elif index_kind(index) == "codebook":
        yield from codebook.decode_chunks(faiss.downcast_index(index), ids, chunk)
    else:
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            yield part, np.stack([index.reconstruct(int(i)) for i in part])


def kind_problem(index: faiss.Index, space: str, kind: str,
                 codebooks: dict[str, np.ndarray]) -> str | None:
    """Why ``index`` cannot be the ``space`` index of a ``kind`` index built with ``codebooks``
    (the checkpoint's), or None."""
    found = index_kind(index)
    if found != kind:
        return f"the {space} index is of kind {found}, index.json records {kind}"
    if isinstance(index, codebook.ConcatScan):
        return None  # its parts are checked as the normal and abnormal indices
    if kind == "codebook" and not np.array_equal(
            codebook.stored_centroids(faiss.downcast_index(index)),
            codebook.centroids(space, codebooks)):
        return f"the {space} index's centroids are not the checkpoint's codebooks"
    return None


def slice_bytes(index: faiss.Index) -> int:
    """Bytes each slice adds to an index file: its vector (flat) or code (codebook), and its id;
    none for a codebook kind's concat, which has no file. A codebook index file also holds the
    codebooks, whatever its size."""
    if isinstance(index, codebook.ConcatScan):
        return 0
    if index_kind(index) == "codebook":
        return faiss.downcast_index(index).code_size + 8
    return 4 * index.d + 8


def search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Parameters that restrict a search of ``index`` to the slice ids ``selector`` accepts."""
    if index_kind(index) == "codebook":
        return faiss.SearchParametersIVF(sel=selector, nprobe=1)
    return faiss.SearchParameters(sel=selector)


def write_generation(index_dir: Path, generation: int, indices: dict[str, faiss.Index]) -> None:
    """The files of the indices that store vectors: three for flat, two for codebook."""
    for space, index in _stored(indices).items():
        chunk = faiss.serialize_index(index)
        atomic_write(faiss_path(index_dir, space, generation),
                     lambda fh, c=chunk: fh.write(memoryview(c)))


def stored_spaces(kind: str) -> tuple[str, ...]:
    """The spaces whose index a generation of ``kind`` keeps in a file."""
    return codebook.STORED if kind == "codebook" else SPACES


def read_generation(index_dir: Path, generation: int) -> dict[str, faiss.Index]:
    """The three spaces' indices, of the kind index.json records. A codebook generation's concat
    is read from its normal and abnormal indices (a concat file an older version wrote beside
    them is not read)."""
    spaces = stored_spaces(manifest_kind(read_manifest(index_dir)))
    out = {}
    for space in spaces:
        path = faiss_path(index_dir, space, generation)
        if not path.is_file():
            raise IndexStoreError(f"{path}: index file of the active generation is missing")
        try:
            out[space] = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexStoreError(f"{path}: unreadable FAISS index ({exc})") from exc
    if "concat" not in out:
        out["concat"] = codebook.ConcatScan(out["normal"], out["abnormal"])
    return out


def index_ids(index: faiss.Index) -> np.ndarray:
    """The slice ids an index holds."""
    if isinstance(index, codebook.ConcatScan):
        return index_ids(index.normal)
    if index_kind(index) == "codebook":
        return codebook.stored(faiss.downcast_index(index))[0]
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def thumbnail_path(index_dir: Path, patient_id: int) -> Path:
    return Path(index_dir) / SLICES_DIR / f"{patient_id}.npz"


def thumbnails_npz(slice_index: np.ndarray, image_u8: np.ndarray,
                   labels: np.ndarray | None) -> bytes:
    """A patient's slices as compressed .npz bytes: ``slice_index``, ``image`` (S, 256, 256)
    uint8 and, with a segmentation, ``labels`` (S, 256, 256) uint8 BraTS labels.

    Deflate level 1, not ``np.savez_compressed``'s 6: on synthetic slices it compresses in 58 %
    of the time for 4 % more bytes, and this runs in the indexer's loader workers, beside the
    encoder on the same cores. ``np.load`` reads either."""
    arrays = {"slice_index": slice_index, "image": image_u8}
    if labels is not None:
        arrays["labels"] = labels
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_thumbnails(index_dir: Path, patient_id: int, npz: bytes) -> None:
    atomic_write(thumbnail_path(index_dir, patient_id), lambda fh: fh.write(npz))


def read_thumbnails(index_dir: Path, patient_id: int) -> dict[str, np.ndarray]:
    with np.load(thumbnail_path(index_dir, patient_id)) as z:
        return {k: z[k] for k in z.files}


def collect_garbage(index_dir: Path, active_generation: int | None,
                    patient_ids: set[int]) -> list[Path]:
    """Remove index files of other generations and thumbnails of patients not in the catalogue,
    and temporary files of interrupted writes. Returns what was removed."""
    removed = []
    for path in (Path(index_dir) / FAISS_DIR).glob("*"):
        m = _FAISS_NAME.match(path.name)
        if path.name.endswith(".tmp") or (m and int(m.group(2)) != active_generation):
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in (Path(index_dir) / SLICES_DIR).glob("*"):
        stem = path.name.removesuffix(".npz")
        if path.name.endswith(".tmp") or (stem.isdigit() and int(stem) not in patient_ids):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


_gpu_resources = None


def search_index(index: faiss.Index) -> faiss.Index:
    """The index to search with: a flat index moves to GPU 0 when FAISS sees one; the codebook
    kind has no GPU version in FAISS and stays on the CPU."""
    global _gpu_resources
    if index_kind(index) != "flat" or faiss.get_num_gpus() == 0:
        return index
    if _gpu_resources is None:  # one set of GPU scratch memory and streams per process
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
