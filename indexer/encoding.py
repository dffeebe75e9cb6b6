"""The per-case steps every index build runs, in whatever process runs them: read and preprocess
one case (``read_case``), encode its slices (``encode_case``). The one-process build
(``indexer.build``) calls them in a DataLoader's workers and its own process; the Ray build
(``indexer.distributed``) in Ray's read tasks and encoding actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from indexer import store
from ingest.layouts import Case
from ingest.preprocess import load_case_in_model_space
from model.data import preprocess
from model.data.dataset import case_slices
from model.data.nifti import VolumeError


@dataclass
class EncodedPatient:
    """One case's codes and catalogue values, as the index writer takes them."""

    case: Case
    slice_index: np.ndarray  # (S,)
    normal_idx: np.ndarray  # (S, 8, 8)
    abnormal_idx: np.ndarray  # (S, 8, 8)
    thumbnails: bytes  # .npz of the slices as uint8 images and label maps (store.thumbnails_npz)
    areas: np.ndarray | None  # (S, 3) pixels of labels 1, 2, 4; None without segmentation
    brain_area: np.ndarray  # (S,)


@dataclass
class CaseSlices:
    """One case read and preprocessed: everything an index needs of it but its codes."""

    images: np.ndarray  # (S, 256, 256) float32 brain slices in the model's frame
    slice_index: np.ndarray  # (S,)
    areas: np.ndarray | None  # (S, 3) pixels of labels 1, 2, 4; None without segmentation
    brain_area: np.ndarray  # (S,)
    thumbnails: bytes  # store.thumbnails_npz


def read_case(case: Case) -> CaseSlices | str:
    """A case's brain slices in the model's frame, or the reason it is unreadable: the one
    per-case reading step of every build (the DataLoader's workers, Ray's read tasks)."""
    try:
        # A T1-Gd outside the model's space is skull-stripped and registered first.
        vols = load_case_in_model_space(case)
    except VolumeError as exc:
        return f"{exc.path}: {exc.problem}"
    except ValueError as exc:
        return f"{case.t1ce}: {exc}"
    stacks = case_slices(vols)
    if len(stacks.slice_index) == 0:
        return (f"{case.t1ce}: no axial slice with at least "
                f"{preprocess.MIN_BRAIN_PIXELS} brain pixels")
    seg = areas = None
    if vols.seg is not None:
        seg = preprocess.axial_slices(vols.seg)[stacks.slice_index]
        areas = np.stack([(seg == k).sum(axis=(1, 2)) for k in (1, 2, 4)], axis=1)
    thumbnails = store.thumbnails_npz(stacks.slice_index,
                                      np.rint(stacks.image * 255).astype(np.uint8), seg)
    return CaseSlices(images=stacks.image, slice_index=stacks.slice_index, areas=areas,
                      brain_area=(stacks.image > 0).sum(axis=(1, 2)), thumbnails=thumbnails)


def encode_case(model, case: Case, read: CaseSlices, batch_size: int,
                device: torch.device) -> EncodedPatient:
    """The per-case encoding step of every build (this process, Ray's encoding actors)."""
    normal, abnormal = encode_slices(model, read.images, batch_size, device)
    return EncodedPatient(case=case, slice_index=read.slice_index, normal_idx=normal,
                          abnormal_idx=abnormal, thumbnails=read.thumbnails, areas=read.areas,
                          brain_area=read.brain_area)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def encode_slices(model, images: np.ndarray, batch_size: int, device: torch.device):
    """(S, 256, 256) float32 -> normal and abnormal code indices, each (S, 8, 8) int64."""
    normal, abnormal = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size][:, None]).to(device)
        codes = model.encode(x)
        normal.append(codes.normal_indices.cpu().numpy())
        abnormal.append(codes.abnormal_indices.cpu().numpy())
    return np.concatenate(normal), np.concatenate(abnormal)
