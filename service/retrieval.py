"""The retrieval engine the API serves: model, three FAISS indices and the catalogue, loaded once.

Nothing here knows HTTP. ``Retrieval.open`` loads an index directory's active generation and the
checkpoint it was built with (refusing any other), and keeps in memory what every request needs:
the codebooks, each slice's code indices, patient and label flags (for filters inside the FAISS
search and for the per-position distance maps). Uploaded pixels live only in the arguments and
return values of these methods.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from indexer import store
from indexer.build import DEFAULT_CHECKPOINT, codebooks_of
from indexer.catalog import IndexBuild, Patient, Slice, active_build, decode_codes, open_catalog
from indexer.layout import DIMS, LAYOUT_VERSION, SPACES, position_distances, space_vectors
from model.checkpoint import CheckpointError, load_model
from model.data.render import SEG_PALETTE, grey_rgb, overlay
from service.reference import Reference

log = logging.getLogger(__name__)

CLASS_TO_BRATS = np.array([0, 1, 2, 4], np.uint8)  # model class -> BraTS label (TC 1, ED 2, ET 4)
BRATS_CLASSES = {"TC": 1, "ED": 2, "ET": 4}  # necrotic tumour core, edema, enhancing tumour
THUMBNAIL_CACHE = 64  # patients whose slice images stay decoded in memory


class RetrievalError(ValueError):
    """The index cannot be served as asked; the message says why."""


class NotFound(LookupError):
    """No such slice or patient in the index."""


@dataclass
class Timings:
    """Seconds spent per stage of one request (decode, encode, search, catalogue, render)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Codes:
    """One query's code indices, (8, 8) each."""

    normal: np.ndarray
    abnormal: np.ndarray


@dataclass
class Drawn:
    """What the model draws for a query slice: code indices and three images."""

    codes: Codes
    reconstruction: np.ndarray  # x_hat+, (256, 256) in [0, 1]
    pseudo_normal: np.ndarray  # x_hat-, (256, 256) in [0, 1]
    labels: np.ndarray  # predicted BraTS labels (256, 256) uint8


@dataclass
class Hit:
    rank: int
    slice_id: int
    patient_id: str
    slice_index: int
    distance: float
    has_abnormality: bool | None
    has_labels: bool
    position_distances: np.ndarray  # (8, 8)
    match_percentile: float | None = None  # see service/reference.py


def png_bytes(rgb_or_grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb_or_grey).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def grey_png(image: np.ndarray) -> bytes:
    """A [0, 1] slice as an 8-bit grey PNG."""
    return png_bytes(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))


def overlay_png(image: np.ndarray, labels: np.ndarray) -> bytes:
    """A [0, 1] slice with BraTS labels blended over it, as an RGB PNG."""
    return png_bytes(overlay(image, labels, SEG_PALETTE) if labels.any() else grey_rgb(image))


class Retrieval:
    """Loaded once per process; every method is safe to call from several threads."""

    def __init__(self, index_dir: Path, model, codebooks: dict[str, np.ndarray],
                 indices: dict[str, faiss.Index], build: IndexBuild, engine,
                 slice_ids: np.ndarray, slice_patient: np.ndarray, slice_index: np.ndarray,
                 slice_abnormal: np.ndarray, codes: np.ndarray, patients: dict[int, tuple],
                 device: torch.device, inference_workers: int = 1,
                 model_note: str | None = None, eval_headline: dict | None = None):
        self.index_dir = index_dir
        self.model = model
        self.codebooks = codebooks
        self.indices = indices
        self.search_indices = {s: store.search_index(i) for s, i in indices.items()}
        self.faiss_gpu = faiss.get_num_gpus() > 0
        self.build = build
        self.engine = engine
        self.slice_ids = slice_ids  # (N,) sorted
        self.slice_patient = slice_patient  # (N,) internal patient id
        self.slice_index = slice_index  # (N,) axial index
        self.slice_abnormal = slice_abnormal  # (N,) int8: 1, 0, or -1 without labels
        self.codes = codes  # (N, 2, 8, 8) uint16: normal, abnormal
        self.patients = patients  # internal id -> (external id, has labels)
        self.patient_by_external = {ext: pid for pid, (ext, _) in patients.items()}
        self.device = device
        self.model_note = model_note  # the checkpoint's note for users, if it has one
        self.eval_headline = eval_headline  # its `cbir eval` headline figures, if it has them
        self._inference = threading.Semaphore(inference_workers)
        self._thumbs: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.slices_per_patient = int(np.bincount(
            np.unique(slice_patient, return_inverse=True)[1]).max()) if len(slice_patient) else 0
        self.reference = Reference.measure(codebooks, codes, slice_patient)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, index_dir: Path | str, db_url: str | None = None,
             checkpoint: Path | str | None = None, device: str = "auto",
             inference_workers: int = 1) -> Retrieval:
        index_dir = Path(index_dir)
        try:
            manifest = store.read_manifest(index_dir)
        except store.IndexStoreError as exc:
            raise RetrievalError(str(exc)) from exc
        url = db_url or manifest.get("db_url") or store.default_db_url(index_dir)
        engine = open_catalog(url, migrate=False)
        with Session(engine) as session:
            try:
                build = active_build(session)
            except Exception as exc:  # no tables: a build never committed
                raise RetrievalError(f"{index_dir}: the catalogue has no index build; run "
                                     f"`cbir index build`") from exc
            if build is None:
                raise RetrievalError(f"{index_dir}: the catalogue has no active index build")
            session.expunge(build)
            rows = session.execute(
                select(Slice.id, Slice.patient_id, Slice.slice_index, Slice.has_abnormality,
                       Slice.normal_codes, Slice.abnormal_codes).order_by(Slice.id)).all()
            patients = {
                p.id: (p.external_id, bool(has))
                for p, has in session.execute(select(
                    Patient, func.count(Slice.has_abnormality)).outerjoin(Slice).group_by(
                        Patient.id)).all()}
        if build.layout_version != LAYOUT_VERSION:
            raise RetrievalError(f"the index uses vector layout {build.layout_version}; this "
                                 f"code reads layout {LAYOUT_VERSION}: rebuild the index")
        torch_device = torch.device(
            "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
            else "cpu")
        model, ckpt = _load_matching_checkpoint(checkpoint, manifest, build, torch_device)
        model_note = ckpt.get("note")
        try:
            indices = store.read_generation(index_dir, build.generation)
        except store.IndexStoreError as exc:
            raise RetrievalError(str(exc)) from exc
        n = len(rows)
        codes = np.zeros((n, 2, 8, 8), np.uint16)
        for i, r in enumerate(rows):
            codes[i, 0] = decode_codes(r.normal_codes)
            codes[i, 1] = decode_codes(r.abnormal_codes)
        abnormal = np.array([-1 if r.has_abnormality is None else int(r.has_abnormality)
                             for r in rows], np.int8)
        retrieval = cls(
            index_dir=index_dir, model=model, codebooks=codebooks_of(model), indices=indices,
            build=build, engine=engine,
            slice_ids=np.array([r.id for r in rows], np.int64),
            slice_patient=np.array([r.patient_id for r in rows], np.int64),
            slice_index=np.array([r.slice_index for r in rows], np.int64),
            slice_abnormal=abnormal, codes=codes, patients=patients, device=torch_device,
            inference_workers=inference_workers, model_note=model_note,
            eval_headline=ckpt.get("eval_headline"))
        problems = retrieval.consistency_problems()
        if problems:
            raise RetrievalError("index and catalogue disagree: " + "; ".join(problems))
        log.info("serving generation %d: %d slices of %d patients, preset %s", build.generation,
                 n, len(patients), build.preset)
        return retrieval

    def consistency_problems(self) -> list[str]:
        """What /readyz checks: every index holds exactly the catalogue's slice ids."""
        problems = []
        for space in SPACES:
            index = self.indices[space]
            if index.d != DIMS[space]:
                problems.append(f"{space} index has {index.d} dimensions, not {DIMS[space]}")
            if index.ntotal != len(self.slice_ids):
                problems.append(f"{space} index holds {index.ntotal} vectors, the catalogue "
                                f"{len(self.slice_ids)} slices")
            elif not np.array_equal(np.sort(store.index_ids(index)), self.slice_ids):
                problems.append(f"{space} index ids differ from the catalogue's")
        if self.build.slices != len(self.slice_ids):
            problems.append(f"build {self.build.generation} records {self.build.slices} slices, "
                            f"the catalogue holds {len(self.slice_ids)}")
        return problems

    def active_generation(self) -> int | None:
        """The generation the catalogue has active now (an add or remove since start-up moves it
        past the one served; restarting the server loads the new one)."""
        with Session(self.engine) as session:
            build = active_build(session)
            return None if build is None else build.generation

    def close(self) -> None:
        self.engine.dispose()

    # -- the model -------------------------------------------------------------------------------

    @torch.inference_mode()
    def draw(self, image: np.ndarray, timings: Timings) -> Drawn:
        """Encode a (256, 256) slice; draw x_hat+, x_hat- and the predicted lesion."""
        with self._inference, timings.stage("encode"):
            x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
            x = x.to(self.device)
            drawn = self.model.draw(x)  # codes, logits, x_hat+, x_hat-: (1, ., 256, 256)
            codes = drawn.codes
            return Drawn(
                codes=Codes(codes.normal_indices[0].cpu().numpy(),
                            codes.abnormal_indices[0].cpu().numpy()),
                reconstruction=drawn.reconstruction[0, 0].clamp(0, 1).float().cpu().numpy(),
                pseudo_normal=drawn.pseudo_normal[0, 0].clamp(0, 1).float().cpu().numpy(),
                labels=CLASS_TO_BRATS[drawn.logits[0].argmax(0).cpu().numpy()],
            )

    @torch.inference_mode()
    def draw_pair(self, normal: np.ndarray, abnormal: np.ndarray,
                  timings: Timings) -> tuple[np.ndarray, np.ndarray]:
        """The composite image of one normal and one abnormal index map, and its lesion labels."""
        with self._inference, timings.stage("encode"):
            n = torch.from_numpy(normal.astype(np.int64))[None].to(self.device)
            a = torch.from_numpy(abnormal.astype(np.int64))[None].to(self.device)
            logits = self.model.segment(self.model.abnormal_quantizer.lookup(a))
            image = self.model.decode_indices(n, a)
            return (image[0, 0].clamp(0, 1).float().cpu().numpy(),
                    CLASS_TO_BRATS[logits[0].argmax(0).cpu().numpy()])

    # -- search ----------------------------------------------------------------------------------

    def search(self, space: str, codes: Codes, k: int, timings: Timings,
               exclude_patient: str | None = None, has_abnormality: bool | None = None,
               exclude_patient_ids: tuple[int, ...] = (), group_by_patient: bool = False,
               ) -> list[Hit]:
        """The k nearest slices to a query's codes in ``space``, filters applied inside FAISS.

        ``group_by_patient``: the nearest slice of each of the k nearest patients. Fewer than k
        come back only when fewer than k slices (patients) pass the filters.
        """
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}: use one of {', '.join(SPACES)}")
        excluded = list(exclude_patient_ids)
        if exclude_patient is not None:
            excluded.append(self.patient_id(exclude_patient))
        with timings.stage("search"):
            query = space_vectors(self.codebooks, codes.normal[None], codes.abnormal[None],
                                  spaces=(space,))[space]
            keep = np.ones(len(self.slice_ids), bool)
            if excluded:
                keep &= ~np.isin(self.slice_patient, excluded)
            if has_abnormality is not None:
                keep &= self.slice_abnormal == int(has_abnormality)
            filtered = not keep.all()
            available = int(keep.sum())
            # Grouped: each patient holds at most `slices_per_patient` of the nearest m, so the
            # nearest k * slices_per_patient hold k distinct patients whenever k exist.
            wanted = k * self.slices_per_patient if group_by_patient else k
            k_eff = int(min(wanted, available))
            if k_eff == 0:
                return []
            if filtered or k_eff > 2048:
                # The selector sees slice ids: IndexIDMap2 translates it to its internal rows.
                # GPU indices take no selector (and no k over 2048): those run on the CPU copy.
                params = (faiss.SearchParameters(sel=faiss.IDSelectorBatch(self.slice_ids[keep]))
                          if filtered else None)
                distances, ids = self.indices[space].search(query, k_eff, params=params)
            else:
                distances, ids = self.search_indices[space].search(query, k_eff)
            distances, ids = distances[0], ids[0]
            valid = ids >= 0
            distances, ids = distances[valid], ids[valid]
            rows = np.searchsorted(self.slice_ids, ids)
            if group_by_patient:
                # FAISS returns them nearest first: a patient's first row is its nearest slice.
                _, first = np.unique(self.slice_patient[rows], return_index=True)
                pick = np.sort(first)[:k]
                distances, ids, rows = distances[pick], ids[pick], rows[pick]
        with timings.stage("catalogue"):
            hits = []
            for rank, (dist, sid, row) in enumerate(zip(distances, ids, rows, strict=True),
                                                    start=1):
                stored = self.codes[row]
                other = space_vectors(self.codebooks, stored[0][None].astype(np.int64),
                                      stored[1][None].astype(np.int64), spaces=(space,))[space]
                ext, has_labels = self.patients[int(self.slice_patient[row])]
                flag = int(self.slice_abnormal[row])
                hits.append(Hit(rank=rank, slice_id=int(sid), patient_id=ext,
                                slice_index=int(self.slice_index[row]),
                                distance=float(dist), has_abnormality=None if flag < 0 else
                                bool(flag), has_labels=has_labels,
                                position_distances=position_distances(query, other),
                                match_percentile=None if self.reference is None else
                                self.reference.match_percentile(space, float(dist))))
        return hits

    def patient_id(self, external_id: str) -> int:
        """The internal id of an indexed patient; ``NotFound`` names an unknown one."""
        pid = self.patient_by_external.get(external_id)
        if pid is None:
            raise NotFound(f"patient {external_id!r} is not in the index")
        return pid

    def far_warning(self, space: str, hits: list[Hit]) -> str | None:
        """A reader's warning when the nearest hit lies far beyond this index's typical nearest
        neighbour (noise, another sequence or orientation, not a brain)."""
        if not hits or self.reference is None:
            return None
        ratio = self.reference.far(space, hits[0].distance)
        if ratio is None:
            return None
        return (f"the nearest indexed slice is {ratio:.1f}x farther than this index's typical "
                f"nearest neighbour in the {space} space (median "
                f"{self.reference.median(space):.4g}), farther than any of the "
                f"{len(self.reference.distances[space])} sampled best matches between indexed "
                f"patients: the query may not be an axial T1ce brain slice like those indexed, "
                f"so these results may mean little")

    def patient_list(self) -> list[tuple[str, int, bool, int]]:
        """Every indexed patient: external id, slices, whether labelled, slices with a lesion."""
        counts = np.bincount(self.slice_patient, minlength=max(self.patients, default=0) + 1)
        lesion = np.bincount(self.slice_patient, weights=self.slice_abnormal == 1,
                             minlength=len(counts))
        return sorted((ext, int(counts[pid]), has, int(lesion[pid]))
                      for pid, (ext, has) in self.patients.items())

    def slice_codes(self, slice_id: int) -> tuple[Codes, int]:
        """An indexed slice's codes and its (internal) patient id."""
        row = self._row(slice_id)
        stored = self.codes[row].astype(np.int64)
        return Codes(stored[0], stored[1]), int(self.slice_patient[row])

    def _row(self, slice_id: int) -> int:
        row = int(np.searchsorted(self.slice_ids, slice_id))
        if row >= len(self.slice_ids) or self.slice_ids[row] != slice_id:
            raise NotFound(f"slice {slice_id} is not in the index")
        return row

    # -- catalogue and images --------------------------------------------------------------------

    def slice_row(self, slice_id: int) -> tuple[Slice, str]:
        self._row(slice_id)
        with Session(self.engine) as session:
            row = session.get(Slice, slice_id)
            if row is None:
                raise NotFound(f"slice {slice_id} is not in the catalogue")
            session.expunge(row)
        return row, self.patients[row.patient_id][0]

    def patient(self, external_id: str) -> tuple[Patient, list[tuple[int, int, bool | None]]]:
        pid = self.patient_id(external_id)
        with Session(self.engine) as session:
            patient = session.get(Patient, pid)
            if patient is None:
                raise NotFound(f"patient {external_id!r} is not in the catalogue")
            slices = session.execute(select(Slice.id, Slice.slice_index, Slice.has_abnormality)
                                     .where(Slice.patient_id == pid)
                                     .order_by(Slice.slice_index)).all()
            session.expunge(patient)
        return patient, [tuple(s) for s in slices]

    def has_labels(self, slice_id: int) -> bool:
        return self.patients[int(self.slice_patient[self._row(slice_id)])][1]

    def slice_pixels(self, slice_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        """An indexed slice's image (256, 256) in [0, 1] and its BraTS labels, if any."""
        row = self._row(slice_id)
        pid, index = int(self.slice_patient[row]), int(self.slice_index[row])
        thumbs = self._thumbnails(pid)
        at = np.flatnonzero(thumbs["slice_index"] == index)
        if at.size != 1:
            raise NotFound(f"slice {slice_id}: no stored image (thumbnails of patient "
                           f"{self.patients[pid][0]} lack slice {index})")
        image = thumbs["image"][at[0]].astype(np.float32) / 255.0
        labels = thumbs["labels"][at[0]] if "labels" in thumbs else None
        return image, labels

    def _thumbnails(self, pid: int) -> dict[str, np.ndarray]:
        with self._thumbs_lock:
            if pid in self._thumbs:
                self._thumbs.move_to_end(pid)
                return self._thumbs[pid]
        try:
            thumbs = store.read_thumbnails(self.index_dir, pid)
        except FileNotFoundError:
            raise NotFound(f"patient {self.patients[pid][0]} was removed from the index after "
                           f"this server started; restart it to serve the current index") from None
        with self._thumbs_lock:
            self._thumbs[pid] = thumbs
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return thumbs

    def counts(self) -> dict[str, int]:
        return {"patients": len(self.patients), "slices": len(self.slice_ids),
                "abnormal_slices": int((self.slice_abnormal == 1).sum())}


def _load_matching_checkpoint(checkpoint, manifest: dict, build: IndexBuild,
                              device: torch.device):
    """The model whose weights the index was built with: the given checkpoint, else the one the
    manifest names, else the shipped default; anything else is refused."""
    candidates = [Path(checkpoint)] if checkpoint else [
        Path(p) for p in (manifest.get("checkpoint"), DEFAULT_CHECKPOINT) if p]
    tried = []
    for path in candidates:
        if not path.is_file():
            tried.append(f"{path} (not found)")
            continue
        try:
            model, ckpt = load_model(path, device)
        except CheckpointError as exc:
            tried.append(str(exc))
            continue
        if ckpt["weights_sha256"] == build.checkpoint_sha256:
            return model, ckpt
        tried.append(f"{path} (weights {ckpt['weights_sha256'][:12]}, the index was built with "
                     f"{build.checkpoint_sha256[:12]})")
    raise RetrievalError("no checkpoint matching the index: " + "; ".join(tried))
