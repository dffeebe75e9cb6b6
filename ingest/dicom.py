"""DICOM series -> one ``Volume`` (RAS+ array and affine), the same a NIfTI reader gives.

A series is the images that share a SeriesInstanceUID: classic single-frame files (one slice
each) or enhanced multi-frame objects (one file, many frames), or both. Geometry comes from the
headers alone, never from file names or order:

- every image plane must share ImageOrientationPatient, PixelSpacing, Rows and Columns;
- planes are sorted by ImagePositionPatient projected on the slice normal (row x column
  direction cosines), so a shuffled folder reads as an ordered one;
- the slice step must be along the normal: a step that leans off it is gantry tilt (or a
  non-zero GantryDetectorTilt), refused, since the voxels would not lie on a box grid;
- the steps must be even: a step longer than the others means slices are missing, reported with
  where and how many, rather than read as a stretched volume;
- pixel values go through RescaleSlope and RescaleIntercept.

Which series of a folder holding several (``pick_series``), in order:

1. ``series_uid`` when given (``--series UID``); a UID not there is an error listing those there.
2. A folder holding one image series: that one.
3. The post-contrast T1 (T1-Gd), among MR series: a series is post-contrast when its
   ContrastBolusAgent (or the enhanced ContrastBolusAgentSequence) is filled in, or its
   SeriesDescription holds a post-contrast word (``POST_WORDS``: gd, gad, post, +c, ce, t1ce,
   contrast, ...) and no pre-contrast word (``PRE_WORDS``: pre, native, without, ...); series
   whose description names another weighting (``OTHER_WORDS``: t2, flair, dwi, adc, swi,
   localizer, ...) are left out, since a T2 or FLAIR acquired after injection carries the agent
   tag too. One left: that one. Several: those whose description also names T1 (``T1_WORDS``:
   t1, mprage, spgr, bravo, vibe, ...); one left: that one.
4. Otherwise (none, or several that all or none name T1) the choice is refused with the list
   of series (UID, description, images), so the reader names one with ``--series`` (or
   ``series=`` on an upload).

Patient names and ids are never read into anything this module returns or logs: the only
identifiers kept are the StudyInstanceUID and SeriesInstanceUID.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from model.data.nifti import Volume, reorient_to_ras

log = logging.getLogger(__name__)

# Two direction cosines agree within this (about 0.06 degrees); two spacings within this (mm).
ORIENTATION_ATOL = 1e-3
SPACING_ATOL_MM = 1e-3
# The slice step may lean off the normal by this angle before it counts as gantry tilt.
MAX_TILT_DEGREES = 0.5
# A step is uneven (slices missing) when it differs from the median step by more than this
# fraction of it.
SPACING_RTOL = 0.05

POST_WORDS = {"gd", "gad", "gado", "gadolinium", "post", "postcontrast", "contrast", "ce", "plusc",
              "t1ce", "t1c", "t1gd", "t1post", "enhanced"}
PRE_WORDS = {"pre", "precontrast", "native", "nc", "noncontrast", "without", "wo", "plain"}
OTHER_WORDS = {"t2", "t2w", "flair", "dwi", "adc", "swi", "pd", "pdw", "perfusion", "dsc",
               "dce", "tof", "mra", "dti", "localizer", "localiser", "scout", "survey",
               "t2star", "gre", "stir", "trace", "fa"}
T1_WORDS = {"t1", "t1w", "mprage", "spgr", "fspgr", "bravo", "vibe", "tfl", "t1ce", "t1c",
            "t1gd", "t1post", "tfe", "ffe"}


class DicomError(ValueError):
    """A DICOM series that cannot be read as one volume; the message says why."""


class NoSeries(DicomError):
    """No DICOM image at all where a series was expected."""


class SeriesChoice(DicomError):
    """Several series, and the rule cannot tell which is the T1-Gd one (or the one named is not
    there)."""


class SeriesTooLarge(DicomError):
    """More voxels than the caller allows; refused before any pixel is decoded."""


class GantryTilt(DicomError):
    pass


class MissingSlices(DicomError):
    pass


@contextmanager
def readable() -> Iterator[None]:
    """Any failure of pydicom on damaged headers or pixel data (it raises many types, lazily, when
    a value is first read) as a ``DicomError``. The message names the exception type only: a
    pydicom message may quote a value, and a value may be a patient's name."""
    try:
        yield
    except DicomError:
        raise
    except Exception as exc:
        raise DicomError(f"unreadable DICOM header or pixel data ({type(exc).__name__})") \
            from exc


@dataclass(frozen=True)
class SeriesInfo:
    """What a series says of itself in its headers (no patient identifier)."""

    series_uid: str
    study_uid: str
    description: str
    modality: str
    contrast_agent: bool  # ContrastBolusAgent filled in
    images: int  # files (instances)

    def line(self) -> str:
        return f"{self.series_uid} ({self.description or 'no description'}, {self.images} image(s))"


@dataclass(frozen=True)
class DicomVolume:
    """One series read as a volume: the voxels in RAS+ order, and the UIDs that name it."""

    volume: Volume
    study_uid: str
    series_uid: str
    description: str
    source: str = ""  # where it was read: a folder, or a DICOMweb series URL


@dataclass(frozen=True)
class _Plane:
    """One image plane: a single-frame file, or one frame of a multi-frame one."""

    dataset: object  # pydicom Dataset holding the pixels
    frame: int | None  # frame index in a multi-frame dataset, None for a single frame
    position: np.ndarray  # (3,) ImagePositionPatient, LPS mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    spacing: np.ndarray  # (2,) PixelSpacing: between rows, between columns
    slope: float
    intercept: float


def _words(description: str) -> set[str]:
    text = description.lower().replace("+c", " plusc ").replace("c+", " plusc ")
    return set(re.split(r"[^a-z0-9]+", text)) - {""}


def _contrast_agent(ds) -> bool:
    if str(getattr(ds, "ContrastBolusAgent", "") or "").strip():
        return True
    return bool(getattr(ds, "ContrastBolusAgentSequence", None))


def _is_image(ds) -> bool:
    return "SeriesInstanceUID" in ds and ("PixelData" in ds or "Rows" in ds)


def group_series(datasets: Iterable) -> dict[str, list]:
    """Image datasets by SeriesInstanceUID, in the order first seen; others (DICOMDIR,
    structured reports without pixels) are left out."""
    groups: dict[str, list] = {}
    for ds in datasets:
        if _is_image(ds):
            groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return groups


def describe(datasets: list) -> SeriesInfo:
    first = datasets[0]
    return SeriesInfo(series_uid=str(first.SeriesInstanceUID),
                      study_uid=str(getattr(first, "StudyInstanceUID", "") or ""),
                      description=str(getattr(first, "SeriesDescription", "") or "").strip(),
                      modality=str(getattr(first, "Modality", "") or ""),
                      contrast_agent=any(_contrast_agent(ds) for ds in datasets),
                      images=len(datasets))


def _post_contrast(info: SeriesInfo) -> bool:
    words = _words(info.description)
    if words & OTHER_WORDS:
        return False
    return info.contrast_agent or bool(words & POST_WORDS and not words & PRE_WORDS)


def pick_series(infos: list[SeriesInfo], series_uid: str | None = None) -> SeriesInfo:
    """The series to read by the module's rule (see the docstring); ``SeriesChoice`` otherwise."""
    if not infos:
        raise NoSeries("no DICOM image series found")
    listing = "; ".join(i.line() for i in infos)
    if series_uid is not None:
        for info in infos:
            if info.series_uid == series_uid:
                return info
        raise SeriesChoice(f"series {series_uid} is not there; the series found: {listing}")
    if len(infos) == 1:
        return infos[0]
    post = [i for i in infos if i.modality in ("MR", "") and _post_contrast(i)]
    if len(post) > 1:
        post = [i for i in post if _words(i.description) & T1_WORDS] or post
    if len(post) == 1:
        log.info("picked series %s of %d by the T1-Gd rule", post[0].series_uid, len(infos))
        return post[0]
    why = ("none is a post-contrast T1 MR by its description or contrast agent tag" if not post
           else f"{len(post)} look like a post-contrast T1")
    raise SeriesChoice(f"{len(infos)} series and {why}; name one by its SeriesInstanceUID "
                       f"(--series UID, or series=UID with an upload): {listing}")


def _floats(value, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"unreadable {what} {value!r}") from exc
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise DicomError(f"{what} should hold {n} numbers, holds {value!r}")
    return arr


def _planes(ds) -> list[_Plane]:
    """The image planes of one dataset: one for a single-frame image, one per frame for an
    enhanced multi-frame one (geometry from its per-frame or shared functional groups)."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if frames != 1:
            raise DicomError(f"a multi-frame image of {frames} frames without per-frame "
                             f"functional groups: its frames' positions are unknown")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise DicomError(f"an image without {tag}: its place in the volume is unknown")
        return [_Plane(ds, None, _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                       _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                       _floats(ds.PixelSpacing, 2, "PixelSpacing"),
                       float(getattr(ds, "RescaleSlope", 1) or 1),
                       float(getattr(ds, "RescaleIntercept", 0) or 0))]
    shared = getattr(ds, "SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != frames:
        raise DicomError(f"a multi-frame image of {frames} frames with {len(per_frame)} "
                         f"per-frame functional groups")
    planes = []
    for f, group in enumerate(per_frame):
        def find(seq: str, attr: str, group=group):
            for holder in (group, shared):
                if holder is None:
                    continue
                item = getattr(holder, seq, None)
                if item and attr in item[0]:
                    return getattr(item[0], attr)
            return None

        position = find("PlanePositionSequence", "ImagePositionPatient")
        orientation = find("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = find("PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise DicomError(f"frame {f} of a multi-frame image lacks its position, "
                             f"orientation or pixel spacing")
        slope = find("PixelValueTransformationSequence", "RescaleSlope")
        intercept = find("PixelValueTransformationSequence", "RescaleIntercept")
        planes.append(_Plane(ds, f, _floats(position, 3, "ImagePositionPatient"),
                             _floats(orientation, 6, "ImageOrientationPatient"),
                             _floats(spacing, 2, "PixelSpacing"),
                             float(slope if slope is not None else 1),
                             float(intercept if intercept is not None else 0)))
    return planes


def _check_tilt(datasets: list) -> None:
    for ds in datasets:
        tilt = getattr(ds, "GantryDetectorTilt", None)
        if tilt not in (None, "") and abs(float(tilt)) > MAX_TILT_DEGREES:
            raise GantryTilt(f"gantry tilt: GantryDetectorTilt is {float(tilt):g} degrees; "
                             f"tilted slices do not lie on a box grid, and resampling them is "
                             f"not supported: reconstruct the series without tilt")


def _geometry(planes: list[_Plane]) -> tuple[list[_Plane], np.ndarray]:
    """The planes sorted along the slice normal, and the LPS affine of the (col, row, slice)
    voxel grid they span. Raises ``DicomError`` (``GantryTilt``, ``MissingSlices``)."""
    if len(planes) < 2:
        raise DicomError(f"a series of {len(planes)} image plane(s): a volume needs at least 2")
    first = planes[0]
    for p in planes[1:]:
        if not np.allclose(p.orientation, first.orientation, atol=ORIENTATION_ATOL):
            raise DicomError("the images do not share one ImageOrientationPatient (a localizer "
                             "or several stacks in one series): not one volume")
        if not np.allclose(p.spacing, first.spacing, atol=SPACING_ATOL_MM):
            raise DicomError(f"the images do not share one PixelSpacing ({first.spacing} mm "
                             f"and {p.spacing} mm)")
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise DicomError(f"ImageOrientationPatient {first.orientation.tolist()} is not two "
                         f"orthogonal unit vectors")
    depth = np.array([p.position @ normal for p in planes])
    order = np.argsort(depth, kind="stable")
    planes, depth = [planes[i] for i in order], depth[order]
    steps = np.diff(depth)
    if (steps < SPACING_ATOL_MM).any():
        at = depth[1:][steps < SPACING_ATOL_MM]
        raise DicomError(f"{int((steps < SPACING_ATOL_MM).sum())} pair(s) of images at the same "
                         f"position (first at {at[0]:.2f} mm along the normal): several echoes, "
                         f"time points or duplicates in one series, not one volume")
    span = planes[-1].position - planes[0].position
    cos_tilt = abs(span @ normal) / np.linalg.norm(span)
    tilt = float(np.degrees(np.arccos(np.clip(cos_tilt, -1.0, 1.0))))
    if tilt > MAX_TILT_DEGREES:
        raise GantryTilt(f"gantry tilt: the slices step {tilt:.1f} degrees off their normal; "
                         f"tilted slices do not lie on a box grid, and resampling them is not "
                         f"supported: reconstruct the series without tilt")
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > SPACING_RTOL * step
    if uneven.any():
        gaps = [f"after {depth[i]:.2f} mm: {steps[i]:.2f} mm, about "
                f"{max(round(steps[i] / step) - 1, 0)} slice(s) missing"
                for i in np.flatnonzero(uneven)]
        raise MissingSlices(f"uneven slice spacing (slices missing?): the step is {step:.2f} mm "
                            f"but {len(gaps)} step(s) differ: {'; '.join(gaps[:5])}"
                            f"{' ...' if len(gaps) > 5 else ''}")
    affine = np.eye(4)
    affine[:3, 0] = row_cos * first.spacing[1]  # along a row: column index i
    affine[:3, 1] = col_cos * first.spacing[0]  # down a column: row index j
    affine[:3, 2] = span / (len(planes) - 1)
    affine[:3, 3] = planes[0].position
    return planes, affine


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pixels(planes: list[_Plane]) -> np.ndarray:
    """(cols i, rows j, slices k) float32, modality LUT (slope, intercept) applied: the voxel
    order of the affine ``_geometry`` gives, filled plane by plane."""
    frames: tuple[int, np.ndarray] | None = None  # (id of the multi-frame dataset, its frames)
    out = None
    for k, p in enumerate(planes):
        try:
            if p.frame is None:
                arr = p.dataset.pixel_array
            else:
                if frames is None or frames[0] != id(p.dataset):
                    frames = (id(p.dataset), p.dataset.pixel_array)
                arr = frames[1][p.frame]
        except Exception as exc:  # pydicom raises many types for undecodable data
            raise DicomError(f"cannot decode the pixel data ({type(exc).__name__}); "
                             f"uncompressed transfer syntaxes are supported") from exc
        if arr.ndim != 2:
            raise DicomError(f"an image plane of shape {arr.shape}: grey images only")
        if out is None:
            out = np.empty((arr.shape[1], arr.shape[0], len(planes)), dtype=np.float32)
        elif arr.shape != out.shape[1::-1]:
            raise DicomError(f"images of {out.shape[1::-1]} and {arr.shape} pixels in one "
                             f"series")
        out[:, :, k] = arr.T * np.float32(p.slope) + np.float32(p.intercept)
    return out


def series_volume(datasets: list, source: str = "", max_voxels: int | None = None) -> Volume:
    """One series' datasets -> a ``Volume`` in RAS+ order, as ``model.data.nifti`` reads one.

    ``max_voxels`` refuses (``DicomError``) before any pixel is decoded."""
    _check_tilt(datasets)
    planes = [p for ds in datasets for p in _planes(ds)]
    planes, affine_lps = _geometry(planes)
    rows, cols = int(planes[0].dataset.Rows), int(planes[0].dataset.Columns)
    if max_voxels is not None and rows * cols * len(planes) > max_voxels:
        raise SeriesTooLarge(f"the series is {len(planes)} x {rows} x {cols} voxels, more than "
                         f"the {max_voxels} allowed")
    img = reorient_to_ras(nib.Nifti1Image(_pixels(planes), LPS_TO_RAS @ affine_lps))
    return Volume(array=np.ascontiguousarray(np.asanyarray(img.dataobj, dtype=np.float32)),
                  affine=img.affine.copy(), path=Path(source))


def read_series(datasets: Iterable, series_uid: str | None = None, source: str = "",
                max_voxels: int | None = None) -> DicomVolume:
    """The series ``pick_series`` chooses among ``datasets`` (pydicom Datasets), read as one
    volume."""
    with readable():
        groups = group_series(datasets)
        info = pick_series([describe(g) for g in groups.values()], series_uid)
        volume = series_volume(groups[info.series_uid], source, max_voxels)
    return DicomVolume(volume=volume, study_uid=info.study_uid, series_uid=info.series_uid,
                       description=info.description, source=source)


def quiet_pydicom():
    """pydicom, told not to check values as it reads them: its warnings quote the value they
    find wrong, and the value may be a patient's name, which must never reach a log."""
    import pydicom
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def parse(data: bytes):
    """One DICOM file's bytes -> a pydicom Dataset, or None when the bytes are not DICOM;
    ``DicomError`` for a DICOM file too damaged to read."""
    from pydicom.errors import InvalidDicomError

    pydicom = quiet_pydicom()

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types on damaged files
        raise DicomError(f"a damaged DICOM file ({type(exc).__name__})") from exc


def read_folder(folder: Path | str, series_uid: str | None = None) -> DicomVolume:
    """The series of a folder (searched recursively; non-DICOM files are passed over) chosen
    by ``pick_series``. Headers are read first; pixel data only of the series chosen."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    pydicom = quiet_pydicom()
    folder = Path(folder)
    if not folder.is_dir():
        raise NoSeries(f"{folder}: no such folder")
    headers: dict[str, list] = {}
    paths: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "SeriesInstanceUID" not in ds or "Rows" not in ds:
                continue
            uid = str(ds.SeriesInstanceUID)
        except (InvalidDicomError, BytesLengthException, EOFError, ValueError, TypeError,
                AttributeError, OSError, NotImplementedError):
            continue  # not DICOM, or too damaged to place: a gap it leaves is reported
        headers.setdefault(uid, []).append(ds)
        paths.setdefault(uid, []).append(path)
    if not headers:
        raise NoSeries(f"{folder}: no DICOM image found")
    with readable():
        info = pick_series([describe(h) for h in headers.values()], series_uid)
        datasets = [pydicom.dcmread(p) for p in paths[info.series_uid]]
        volume = series_volume(datasets, str(folder))
    return DicomVolume(volume=volume, study_uid=info.study_uid, series_uid=info.series_uid,
                       description=info.description, source=str(folder))
