"""What one server process loads once and keeps across the generations it serves: where the
index lives, the catalogue's engine, the gate on model calls, decoded thumbnails, and the model
matching a generation's weights (``Retrieval.reopen`` reuses it while the weights stay)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.engine import Engine

from indexer import store
from indexer.build import DEFAULT_CHECKPOINT, codebooks_of
from indexer.catalog import IndexBuild
from model.checkpoint import CheckpointError, load_model

THUMBNAIL_CACHE = 64  # patients whose slice images stay decoded in memory


class RetrievalError(ValueError):
    """The index cannot be served as asked; the message says why."""


class GenerationRefused(RetrievalError):
    """A generation that cannot be served; ``generation`` names it."""

    def __init__(self, generation: int, reason: str):
        super().__init__(f"generation {generation}: {reason}")
        self.generation = generation
        self.reason = reason


class ThumbnailCache:
    """Decoded slice images of the patients most recently shown, shared by the generations a
    process serves (a patient id names the same thumbnails in every generation: ids are never
    reused)."""

    def __init__(self, index_dir: Path, size: int = THUMBNAIL_CACHE):
        self.index_dir = index_dir
        self.size = size
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pid: int) -> dict[str, np.ndarray]:
        """Raises ``FileNotFoundError`` when the patient's file is gone."""
        with self._lock:
            if pid in self._cache:
                self._cache.move_to_end(pid)
                return self._cache[pid]
        thumbs = store.read_thumbnails(self.index_dir, pid)
        with self._lock:
            self._cache[pid] = thumbs
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return thumbs


@dataclass(frozen=True)
class Source:
    """What every generation one process serves shares: where the index is, the catalogue's
    engine, the checkpoint asked for, the device, the gate on model calls, the thumbnails."""

    index_dir: Path
    engine: Engine
    checkpoint: Path | None  # None: the one the manifest names, else the shipped default
    device: torch.device
    inference: threading.Semaphore
    thumbnails: ThumbnailCache


@dataclass(frozen=True)
class LoadedModel:
    """The model and what the service reads from its checkpoint."""

    model: torch.nn.Module
    weights_sha256: str
    codebooks: dict[str, np.ndarray]
    note: str | None  # the checkpoint's note for users, if it has one
    eval_headline: dict | None  # its `cbir eval` headline figures, if it has them
    card: str | None = None  # its model card, ``<checkpoint stem>.md`` beside it, if there is one


# A model card larger than this is not served (the shipped one is about 40 kB).
MAX_CARD_BYTES = 1 << 20


def read_card(checkpoint: Path) -> str | None:
    """The model card beside a checkpoint (``checkpoints/cbir-cpu.md`` for
    ``checkpoints/cbir-cpu.pt``), or None when there is none or it is too large to serve."""
    card = checkpoint.with_suffix(".md")
    try:
        if card.stat().st_size > MAX_CARD_BYTES:
            return None
        return card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_manifest(index_dir: Path) -> dict:
    try:
        return store.read_manifest(index_dir)
    except store.IndexStoreError as exc:
        raise RetrievalError(str(exc)) from exc


def load_matching_checkpoint(checkpoint: Path | None, manifest: dict, build: IndexBuild,
                              device: torch.device) -> LoadedModel:
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
            return LoadedModel(model=model, weights_sha256=ckpt["weights_sha256"],
                               codebooks=codebooks_of(model), note=ckpt.get("note"),
                               eval_headline=ckpt.get("eval_headline"), card=read_card(path))
        tried.append(f"{path} (weights {ckpt['weights_sha256'][:12]}, the index was built with "
                     f"{build.checkpoint_sha256[:12]})")
    raise RetrievalError("no checkpoint matching the index: " + "; ".join(tried))
