"""False alarms and detections of the not-a-brain-MRI rules (``service/uploads/sanity.py``).

    python -m bench.nonbrain --synth /tmp/syn [--synth ...] [--real /work/shared/real] \
        [--index DIR]

Brain slices (false alarms): every axial slice with brain of a synthetic cohort (``cbir synth``)
and of the real BraTS-space case, each both as a volume slice (a NIfTI upload) and as its own PNG
export (preprocessing rule 6). Made non-brain images (detections): coronal and sagittal cuts of
the same volumes, phantoms of other body parts (chest, abdomen, pelvis, thighs, a chest X-ray),
noise, scikit-image's sample images (photographs, a CT head phantom, micrographs), all as PNG
uploads; and every slice of the raw clinical case (with skull, scanner space) as NIfTI uploads.
With ``--index``, the same images also go through the model and the index's anatomy rule
(``Retrieval.anatomy_unlike``), and the combined rate (either signal) is printed beside.

Prints one line per group: images, share flagged, and the reasons given. Thresholds are set on the
synthetic and made images only; the real rows are reported, not tuned to.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from ingest.layouts import find_cases
from model.data import preprocess
from model.data.nifti import read_nifti
from service.uploads import NotABrainSlice, decode_query
from service.uploads.sanity import cut, judge, measure

SIZE = preprocess.SLICE_SIZE
CUT_STEP = 4  # every 4th coronal / sagittal cut (neighbouring cuts are near copies)
PHANTOMS_PER_KIND = 30
NOISE_PER_KIND = 15


# -- brain slices ------------------------------------------------------------------------------

def _volumes(root: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(patient, normalised RAS volume) of every case under ``root``."""
    for case in find_cases(root).cases:
        vol = read_nifti(case.t1ce).array
        yield case.pid, preprocess.normalize_intensity(vol)


def axial(volume: np.ndarray) -> list[np.ndarray]:
    stack = preprocess.axial_slices(volume)
    return [s for s in stack if preprocess.brain_area(s) >= preprocess.MIN_BRAIN_PIXELS]


def as_png(image: np.ndarray) -> np.ndarray:
    """Rule 6: what an upload of this image as a PNG becomes."""
    return preprocess.normalize_image(image.astype(np.float64))


# -- cuts of other orientations -----------------------------------------------------------------

def cuts(volume: np.ndarray, plane: str) -> list[np.ndarray]:
    """Coronal (``vol[:, y, :]``) or sagittal (``vol[x, :, :]``) cuts, superior at the top, as PNG
    uploads; only those with as much brain as an indexed axial slice."""
    out = []
    axis = {"coronal": 1, "sagittal": 0}[plane]
    for i in range(0, volume.shape[axis], CUT_STEP):
        image = cut(volume, plane, i)
        if preprocess.brain_area(image) >= preprocess.MIN_BRAIN_PIXELS:
            out.append(as_png(image))
    return out


# -- phantoms of other anatomy ------------------------------------------------------------------

def _ellipse(shape, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    y, x = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def phantom(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An axial MR/CT-like section of another body part, or a chest X-ray, in [0, 1]."""
    shape = (SIZE, SIZE)
    img = np.zeros(shape)
    j = lambda v, f=0.1: v * (1 + rng.uniform(-f, f))  # noqa: E731
    c = SIZE / 2
    if kind == "chest":
        img[_ellipse(shape, c, c, j(80), j(118))] = j(0.5)
        for side in (-1, 1):  # lungs
            img[_ellipse(shape, c - 5, c + side * j(50), j(55), j(38))] = j(0.05, 0.5)
        img[_ellipse(shape, c - 10, c + j(12), j(35), j(30))] = j(0.7)  # heart
        img[_ellipse(shape, c + 55, c, j(14), j(14))] = j(0.9)  # vertebra
    elif kind == "abdomen":
        img[_ellipse(shape, c, c, j(85), j(115))] = j(0.45)
        img[_ellipse(shape, c - 15, c - j(45), j(50), j(55))] = j(0.6)  # liver
        for side in (-1, 1):
            img[_ellipse(shape, c + 30, c + side * j(55), j(22), j(14))] = j(0.8)  # kidneys
        img[_ellipse(shape, c + 55, c, j(15), j(15))] = j(0.9)
    elif kind == "pelvis":
        img[_ellipse(shape, c, c, j(80), j(120))] = j(0.45)
        for side in (-1, 1):  # femoral heads
            img[_ellipse(shape, c + 10, c + side * j(70), j(24), j(24))] = j(0.15)
            img[_ellipse(shape, c + 10, c + side * j(70), j(18), j(18))] = j(0.8)
        img[_ellipse(shape, c - 20, c, j(28), j(35))] = j(0.9)  # bladder
    elif kind == "thighs":
        for side in (-1, 1):
            img[_ellipse(shape, c, c + side * j(58), j(60), j(52))] = j(0.5)
            img[_ellipse(shape, c, c + side * j(58), j(12), j(12))] = j(0.1)
    elif kind == "xray":
        img[:] = j(0.1, 0.5)
        img[_ellipse(shape, c + 60, c, j(170), j(120))] = j(0.7)  # torso to the frame's edge
        for side in (-1, 1):
            img[_ellipse(shape, c, c + side * j(55), j(85), j(42))] = j(0.25)
        img[:, int(c) - 8:int(c) + 8] = np.maximum(img[:, int(c) - 8:int(c) + 8], 0.85)  # spine
    else:
        raise ValueError(f"unknown phantom {kind!r}")
    img = ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 0.02, shape) * (img > 0)
    return as_png(np.clip(img, 0, 1))


def noise(kind: str, rng: np.random.Generator) -> np.ndarray:
    shape = (SIZE, SIZE)
    if kind == "uniform":
        img = rng.uniform(0, 1, shape)
    elif kind == "gaussian":
        img = np.clip(rng.normal(0.5, 0.2, shape), 0, 1)
    elif kind == "blobs":  # smooth noise, dark where low: scattered objects on black
        img = ndimage.gaussian_filter(rng.normal(0, 1, shape), rng.uniform(3, 12))
        img = np.clip(img / img.std() - 0.5, 0, None)
    elif kind == "sparse":  # salt on black
        img = (rng.uniform(0, 1, shape) < rng.uniform(0.02, 0.2)) * rng.uniform(0.2, 1, shape)
    else:
        raise ValueError(f"unknown noise {kind!r}")
    return as_png(img)


def samples() -> list[tuple[str, np.ndarray]]:
    """scikit-image's sample images that ship in its wheel (no download), as PNG uploads."""
    import skimage.data as data

    out = []
    for name in data.__all__:
        if name in ("download_all", "lfw_subset", "stereo_motorcycle", "binary_blobs",
                    "nickel_solidification"):
            continue
        try:
            arr = np.asarray(getattr(data, name)(), np.float64)
        except Exception:  # fetched on first use (pooch), absent offline
            continue
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
        if arr.ndim != 2 or arr.max() <= 0:
            continue
        out.append((name, as_png(np.clip(arr, 0, None))))
    faces = data.lfw_subset()[:40]  # 25 x 25 faces
    out += [(f"face{i}", as_png(f.astype(np.float64))) for i, f in enumerate(faces)]
    return out


def raw_slices(root: Path) -> list[np.ndarray]:
    """Every slice of every raw clinical volume, as a NIfTI upload of it decodes (slices the
    upload refuses as empty are left out)."""
    out = []
    for path in sorted(root.rglob("*.nii.gz")):
        data = path.read_bytes()
        depth = decode_query(data).slice_count
        for k in range(depth):
            try:
                out.append(decode_query(data, k).image)
            except NotABrainSlice:
                continue
    return out


# -- the run ------------------------------------------------------------------------------------

def groups(synth: list[Path], real: Path | None) -> dict[str, tuple[str, list[np.ndarray]]]:
    """name -> (kind: brain or other, images)."""
    out: dict[str, tuple[str, list[np.ndarray]]] = {}
    vols = []
    for root in synth:
        cohort = list(_volumes(root))
        vols += cohort
        name = f"synthetic axial ({root.name})"
        out[name] = ("brain", [s for _, v in cohort for s in axial(v)])
        out[name + ", PNG"] = ("brain", [as_png(s) for s in out[name][1]])
    if real is not None:
        real_vols = list(_volumes(real / "brats-space"))
        out["real axial"] = ("brain", [s for _, v in real_vols for s in axial(v)])
        out["real axial, PNG"] = ("brain", [as_png(s) for s in out["real axial"][1]])
    else:
        real_vols = []
    for plane in ("sagittal", "coronal"):
        out[f"{plane} cuts"] = ("other", [c for _, v in vols + real_vols for c in cuts(v, plane)])
    rng = np.random.default_rng(0)
    out["phantoms"] = ("other", [phantom(k, rng) for k in
                                 ("chest", "abdomen", "pelvis", "thighs", "xray")
                                 for _ in range(PHANTOMS_PER_KIND)])
    out["noise"] = ("other", [noise(k, rng) for k in ("uniform", "gaussian", "blobs", "sparse")
                              for _ in range(NOISE_PER_KIND)])
    out["skimage samples"] = ("other", [img for _, img in samples()])
    if real is not None:
        out["raw clinical (with skull)"] = ("other", raw_slices(real / "raw"))
    return out


def _pct(x: int, n: int) -> str:
    return f"{100 * x / max(n, 1):7.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth", type=Path, required=True, action="append",
                        help="a `cbir synth` cohort (repeatable)")
    parser.add_argument("--real", type=Path, default=None,
                        help="folder holding brats-space/ and raw/ (the shared real case)")
    parser.add_argument("--index", type=Path, default=None,
                        help="an index: also report the model's anatomy rule and both combined")
    parser.add_argument("--dump", type=Path, default=None, help="write every image's features")
    args = parser.parse_args()
    data = groups(args.synth, args.real)
    retrieval = None
    if args.index is not None:
        from service.retrieval import Retrieval, Timings

        retrieval = Retrieval.open(args.index)
    rows, seconds = [], []
    print(f"{'group':30s} {'images':>6s} {'flagged':>8s}"
          + (f" {'anatomy':>8s} {'either':>8s}" if retrieval else "") + "  reasons")
    totals: dict[str, Counter] = {name: Counter() for name in data}
    for name, (_kind, images) in data.items():
        reasons: Counter = Counter()
        flagged = unlike = either = 0
        for image in images:
            start = time.perf_counter()
            feats = measure(image)
            found = judge(feats)
            seconds.append(time.perf_counter() - start)
            flagged += bool(found)
            reasons.update(p.code for p in found)
            hit = bool(found)
            if retrieval is not None:
                drawn = retrieval.draw(image, Timings())
                far = retrieval.anatomy_unlike(drawn.codes, bool(drawn.labels.any()))
                unlike += far
                hit = hit or far
            either += hit
            if args.dump:
                rows.append({"group": name, "flagged": int(bool(found)),
                             **(asdict(feats) if feats else {})})
        n = len(images)
        totals[name].update(images=n, flagged=flagged, either=either)
        print(f"{name:30s} {n:6d} {_pct(flagged, n)}"
              + (f" {_pct(unlike, n)} {_pct(either, n)}" if retrieval else "")
              + "  " + ", ".join(f"{r} {c}" for r, c in reasons.most_common()))
    made = [k for k, (kind, _) in data.items() if kind == "other" and not k.startswith("raw")]
    n_made = sum(totals[k]["images"] for k in made)
    for what in ("flagged", "either") if retrieval else ("flagged",):
        hit = sum(totals[k][what] for k in made)
        print(f"made non-brain images, {what}: {hit}/{n_made} ({100 * hit / max(n_made, 1):.1f}%)")
    print(f"check time: median {1e3 * np.median(seconds):.2f} ms, "
          f"95th percentile {1e3 * np.percentile(seconds, 95):.2f} ms per slice")
    if args.dump:
        keys = sorted({k for r in rows for k in r})
        with args.dump.open("w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
