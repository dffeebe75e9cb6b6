"""Test helpers: DICOM series written with pydicom from a RAS+ volume and its affine, as a
scanner would (one file per slice, or one enhanced multi-frame file), and a phantom volume on
the model's grid."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

# Tags a test looks for afterwards in every stored or logged byte: they must never be there.
PATIENT_NAME = "Kowalczyk^Hieronymus"
PATIENT_ID = "PID-93518-SECRET"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MODEL_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def phantom(seed: int = 0, shape=(240, 240, 155)) -> np.ndarray:
    """An integer 'head' (uint16 values up to ~2000): an ellipsoid with smooth texture and a
    bright blob, different per seed."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    grids = [a.reshape([-1 if d == i else 1 for d in range(3)]) for i, a in enumerate(axes)]
    # A flat head: few brain slices (about 30 of 155) keep indexing it fast.
    radii = rng.uniform(0.7, 0.9, 3) * [1, 1, 0.25]
    inside = sum((g / np.float32(r)) ** 2 for g, r in zip(grids, radii, strict=True)) < 1
    coarse = rng.integers(300, 1000, (6, 6, 5)).astype(np.uint16)
    cells = [np.minimum(np.arange(n) * 6 // n if i < 2 else np.arange(n) * 5 // n, 5)
             for i, n in enumerate(shape)]
    vol = np.where(inside, coarse[np.ix_(*cells)] + np.uint16(300), np.uint16(0))
    centre = rng.uniform(-0.4, 0.4, 3) * [1, 1, 0.3]
    blob = sum((g - np.float32(c)) ** 2 for g, c in zip(grids, centre, strict=True)) < 0.04
    vol[blob & inside] = 2000
    return np.rint(vol).astype(np.uint16)


def _base(sop_class: str, study_uid: str, series_uid: str, description: str,
          agent: str | None) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19410302"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20260102"
    ds.Modality = "MR"
    ds.SeriesDescription = description
    ds.SeriesNumber = 3
    if agent:
        ds.ContrastBolusAgent = agent
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def series_datasets(volume: np.ndarray, affine_ras: np.ndarray, *, study_uid: str | None = None,
                    series_uid: str | None = None, description: str = "AX T1 POST GD",
                    agent: str | None = "GADOBUTROL", multiframe: bool = False,
                    tilt_degrees: float = 0.0, drop: tuple[int, ...] = (),
                    seed: int = 0, slope: float = 1.0) -> list[FileDataset]:
    """The DICOM datasets of ``volume`` (RAS+ voxel order, ``affine_ras``), one per axial slice
    (or one multi-frame), in shuffled order. ``tilt_degrees`` shears the slice positions along
    the column direction, as a tilted gantry does; ``drop`` leaves those slices out."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    lps = LPS_TO_RAS @ affine_ras
    ps_col, ps_row = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_cos, col_cos = lps[:3, 0] / ps_col, lps[:3, 1] / ps_row
    orientation = [round(float(v), 6) for v in (*row_cos, *col_cos)]
    step = np.linalg.norm(lps[:3, 2])
    shear = np.tan(np.radians(tilt_degrees)) * step
    keep = [k for k in range(volume.shape[2]) if k not in drop]
    positions = {k: lps[:3, :3] @ [0, 0, k] + lps[:3, 3] + col_cos * shear * k for k in keep}
    stored = {k: np.ascontiguousarray(np.rint(volume[:, :, k].T / slope)).astype("<u2")
              for k in keep}  # (rows j, cols i)
    rng = np.random.default_rng(seed)
    order = [keep[i] for i in rng.permutation(len(keep))]
    rows, cols = volume.shape[1], volume.shape[0]
    if multiframe:
        ds = _base(EnhancedMRImageStorage, study_uid, series_uid, description, agent)
        ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, len(order)
        measures = Dataset()
        measures.PixelSpacing = [float(ps_row), float(ps_col)]
        measures.SliceThickness = float(step)
        plane = Dataset()
        plane.ImageOrientationPatient = orientation
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = slope, 0
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        shared.PlaneOrientationSequence = [plane]
        shared.PixelValueTransformationSequence = [transform]
        ds.SharedFunctionalGroupsSequence = [shared]
        frames = []
        for k in order:
            pos = Dataset()
            pos.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
            group = Dataset()
            group.PlanePositionSequence = [pos]
            frames.append(group)
        ds.PerFrameFunctionalGroupsSequence = frames
        ds.PixelData = b"".join(stored[k].tobytes() for k in order)
        return [ds]
    out = []
    for n, k in enumerate(order):
        ds = _base(MRImageStorage, study_uid, series_uid, description, agent)
        ds.InstanceNumber = n + 1  # deliberately not the slice order
        ds.Rows, ds.Columns = rows, cols
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [float(ps_row), float(ps_col)]
        ds.SliceThickness = float(step)
        ds.RescaleSlope, ds.RescaleIntercept = slope, 0
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return out


def to_bytes(ds: FileDataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_folder(datasets: list[FileDataset], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(datasets):
        (folder / f"IM{n:04d}").write_bytes(to_bytes(ds))
    return folder


def zip_of(datasets: list[FileDataset], extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for n, ds in enumerate(datasets):
            zf.writestr(f"DICOM/S1/IM{n:04d}", to_bytes(ds))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()
