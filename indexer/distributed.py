"""``cbir index build|add --ray``: the one-process build's per-case steps, run by Ray Data.

A thin driver, after Ray's batch-inference examples: Ray Data lists the cases, reads and
preprocesses each in a CPU task (``indexer.encoding.read_case``), and encodes it in a pool of
actors that each load the model once (``indexer.encoding.encode_slices``; one GPU per actor when
the cluster has GPUs). The codes stream back to the driver in case order, where
``indexer.build.Indexer`` writes one generation exactly as the one-process build does. Ray
schedules and recovers, with Ray Data's defaults: a read task lost with its worker is retried (3
times), a dead encoding actor is restarted and its batch retried. A run that still cannot finish
(an error in a case's code, a cluster gone) raises before anything is committed, so the active
generation stays as it was.

Every node must see the cohort folders and the checkpoint at the same paths (a shared file
system), as the encoding actors open them there.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer import store
from indexer.encoding import EncodedPatient, encode_slices, read_case
from ingest.layouts import Case

log = logging.getLogger(__name__)

INSTALL_HINT = ("--ray needs Ray, an optional extra: pip install 'compositional-cbir[ray]' "
                "(from a checkout: pip install -e '.[ray]')")
# Test hook: when this variable names a file that exists, the encoding actor that finds it
# removes it and dies (os._exit) in the middle of its first batch, as a killed worker would.
FAULT_ENV = "CBIR_RAY_DIE_IF_EXISTS"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray build runs."""

    # "local": a Ray started for this run (even where RAY_ADDRESS is set); "auto": the cluster
    # RAY_ADDRESS names (or the one running on this node); else an address, ray://head:10001.
    address: str = "local"
    # Encoding actors. None: one per GPU when the cluster has GPUs, else half its CPUs (the
    # other half read and preprocess).
    workers: int | None = None


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs both)
    except ImportError as exc:
        raise store.IndexStoreError(INSTALL_HINT) from exc
    return ray


def _read_row(row: dict) -> dict:
    """Ray read task: one case -> its preprocessed slices, or the reason it is unreadable."""
    read = read_case(pickle.loads(row["case"]))
    if isinstance(read, str):
        return {"i": row["i"], "problem": read, "images": np.zeros((0, 256, 256), np.float32),
                "slice_index": np.zeros(0, np.int64), "areas": np.zeros((0, 3), np.int64),
                "has_seg": False, "brain_area": np.zeros(0, np.int64), "thumbnails": b""}
    return {"i": row["i"], "problem": "", "images": read.images,
            "slice_index": read.slice_index,
            "areas": read.areas if read.areas is not None else np.zeros((0, 3), np.int64),
            "has_seg": read.areas is not None, "brain_area": read.brain_area,
            "thumbnails": read.thumbnails}


class _Encoder:
    """Ray actor: the model, loaded once, encodes one case per call."""

    def __init__(self, checkpoint: str, weights_sha256: str, batch_size: int):
        from indexer.encoding import default_device
        from model.checkpoint import load_model

        self.device = default_device()
        self.model, ckpt = load_model(Path(checkpoint), self.device)
        if ckpt["weights_sha256"] != weights_sha256:
            raise store.IndexStoreError(
                f"{checkpoint} on this Ray node holds weights {ckpt['weights_sha256'][:12]}, "
                f"the driver's {weights_sha256[:12]}: every node must see the same checkpoint")
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        armed = os.environ.get(FAULT_ENV)
        if armed:
            try:
                os.remove(armed)
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        normal, abnormal = [], []
        for k in range(len(batch["i"])):
            if batch["problem"][k]:
                normal.append(np.zeros((0, 8, 8), np.int64))
                abnormal.append(np.zeros((0, 8, 8), np.int64))
                continue
            n, a = encode_slices(self.model, np.asarray(batch["images"][k], np.float32),
                                 self.batch_size, self.device)
            normal.append(n)
            abnormal.append(a)
        out = {key: batch[key] for key in batch if key != "images"}  # the pixels stay here
        out["normal_idx"], out["abnormal_idx"] = _column(normal), _column(abnormal)
        return out


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """A batch column of arrays whose first dimension may differ from row to row."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def _encoding_actors(ray, options: RayOptions) -> tuple[int, float, float | None]:
    """(actors, CPUs per actor, GPUs per actor) for this cluster."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    actors = options.workers or (gpus or max(1, int(cpus) // 2))
    if actors < 1:
        raise store.IndexStoreError(f"--ray-workers must be at least 1, got {actors}")
    if gpus:
        return actors, 0, 1.0
    # At most (CPUs - 1) / actors each: actors holding every CPU would leave none to the read
    # tasks, and the pipeline would wait for ever (2 actors on a 2-CPU machine).
    return actors, min(1.0, max(cpus - 1, 0.5) / actors), None


def encode_cases_on_ray(options: RayOptions, checkpoint: Path, weights_sha256: str,
                        cases: list[Case], batch_size: int = 32,
                        progress: bool = True) -> Iterator[EncodedPatient | tuple[Case, str]]:
    """Yield ``EncodedPatient`` or ``(case, problem)`` per case, in case order, as
    ``indexer.build.encode_cases`` does; the work runs on Ray."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    # Case order in, case order out: patient and slice ids are then those of the one-process
    # build. Ray Data's own bars are off; the driver draws one bar per patient.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        actors, cpus, gpus = _encoding_actors(ray, options)
        log.info("encoding %d cases on Ray with %d actors (%.2g CPU, %s GPU each)", len(cases),
                 actors, cpus, gpus or 0)
        # A case travels pickled: Arrow has no column type for it.
        items = [{"i": i, "case": pickle.dumps(case)} for i, case in enumerate(cases)]
        ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
        ds = ds.map(_read_row)
        ds = ds.map_batches(
            _Encoder, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=cpus,
            fn_constructor_kwargs={"checkpoint": str(Path(checkpoint).resolve()),
                                   "weights_sha256": weights_sha256, "batch_size": batch_size})
        yield from _collect(ds, cases, progress)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if started_here:
            ray.shutdown()


def _collect(ds, cases: list[Case], progress: bool):
    bar = tqdm(total=len(cases), desc="indexing (ray)", unit="patient", disable=not progress)
    slices, started, expected = 0, time.perf_counter(), 0
    try:
        for row in ds.iter_rows():
            i = int(row["i"])
            if i != expected:  # preserve_order promises this; a silent reorder would misfile
                raise store.IndexStoreError(f"Ray returned case {i} where case {expected} was "
                                            f"due")
            expected += 1
            bar.update()
            case = cases[i]
            if row["problem"]:
                yield case, str(row["problem"])
                continue
            slices += len(row["slice_index"])
            bar.set_postfix(slices_per_s=f"{slices / (time.perf_counter() - started):.1f}")
            yield EncodedPatient(
                case=case, slice_index=np.asarray(row["slice_index"]),
                normal_idx=np.asarray(row["normal_idx"], np.int64),
                abnormal_idx=np.asarray(row["abnormal_idx"], np.int64),
                thumbnails=bytes(row["thumbnails"]),
                areas=np.asarray(row["areas"]) if row["has_seg"] else None,
                brain_area=np.asarray(row["brain_area"]))
        if expected != len(cases):
            raise store.IndexStoreError(f"Ray returned {expected} of {len(cases)} cases")
    finally:
        bar.close()
