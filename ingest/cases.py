"""The model's space, and the one door every scan goes through to reach it.

The model reads axial slices of volumes on the BraTS/SRI24 grid: 240 x 240 x 155 voxels of
1 mm, in RAS+ order (``model.data.nifti``). ``to_model_space`` is what the upload route, the
indexer and the PACS pull ask for "this volume, in the model's space": a volume already there
(``ingest.preprocess.in_model_space``, the one documented rule) is used as it is; a head volume
elsewhere (native space, skull) is skull-stripped and registered there by ``ingest.preprocess``;
anything else is refused with its shape and spacing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from model.data.nifti import Volume

MODEL_SHAPE = (240, 240, 155)
MODEL_SPACING_MM = 1.0


class NotInModelSpace(ValueError):
    """A volume that is not on the model's grid (and cannot be brought there yet)."""


def to_model_space(volume: Volume) -> Volume:
    """``volume`` (RAS+) on the model's grid: as it is when it lies there already, registered
    there (``ingest.preprocess``) when it holds a head elsewhere, else ``NotInModelSpace``
    naming its shape and spacing."""
    from ingest import preprocess

    shape = tuple(int(n) for n in volume.array.shape)
    zooms = volume.zooms
    if preprocess.in_model_space(volume.array, volume.affine):  # the one rule, documented there
        return volume
    described = (f"a {'x'.join(map(str, shape))} volume at "
                 f"{' x '.join(f'{z:.3g}' for z in zooms)} mm")
    if not preprocess.holds_a_head(shape, volume.affine):
        raise NotInModelSpace(
            f"{described} is not on the model's grid ({'x'.join(map(str, MODEL_SHAPE))} voxels "
            f"at {MODEL_SPACING_MM:g} mm, axis-aligned, the BraTS/SRI24 layout) and covers too "
            f"little to hold a head to register there (at least {preprocess.MIN_EXTENT_MM:.0f} "
            f"mm along each axis)")
    try:
        moved = preprocess.to_model_space(volume.array, volume.affine)
    except ValueError as exc:
        raise NotInModelSpace(f"{described}: {exc}") from exc
    return dataclasses.replace(volume, array=moved.image, affine=moved.affine)


@dataclass(frozen=True)
class Origin:
    """Where an indexed case came from, as the catalogue keeps it: never a patient's name or id
    from DICOM tags, only the study and series UIDs and where they were read."""

    source: str  # a folder, or a DICOMweb URL (without credentials) and the series' path
    cohort: str  # e.g. "dicom" or "dicomweb"
    study_uid: str | None = None
    series_uid: str | None = None


def stage_case(root: Path, pid: str, volume: Volume) -> Path:
    """Write ``volume`` as ``root/<pid>/<pid>_t1ce.nii.gz``, the layout the indexer reads, so a
    DICOM-sourced case follows the same indexing path as a NIfTI one. The file holds the voxels
    and the affine only."""
    folder = Path(root) / pid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pid}_t1ce.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(volume.array, dtype=np.float32), volume.affine), path)
    return path
