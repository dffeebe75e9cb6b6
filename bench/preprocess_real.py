"""The raw real case through ``ingest.preprocess``, measured against its BraTS-space version.

    python -m bench.preprocess_real [--raw DIR] [--brats DIR] [--checkpoint PT]

Prints, for ``../shared/real/raw/TCGA-FG-6692`` (native T1-Gd with skull, 0.9 x 0.9 x 5.5 mm)
against ``../shared/real/brats-space/REAL_TCGA-FG-6692`` (the same scan after BraTS-style
preprocessing, and the consensus label of five BraTS algorithms):

- brain-mask Dice on the grid (ours: the registered deepBET mask; theirs: voxels > 0), rigid
  (the default) and with the affine stage;
- Pearson correlation of the two normalised images inside both masks, as they are and after a
  2 mm Gaussian on both (the two pipelines interpolate the 5.5 mm slices differently);
- seconds per volume for the T1-Gd alone (median of ``--repeats``), and with T1, T2 and FLAIR
  co-registered;
- the shipped model's predicted lesion (any class) against the consensus label (any label),
  Dice over the slices both volumes index (>= ``MIN_BRAIN_PIXELS`` brain pixels), on our
  preprocessed raw case and on the given BraTS-space volume;
- how far the synthetic phantoms' MNI template placement (``GRID_TO_MNI``) lies from the SRI24
  brain: Dice of the two brain masks as placed, the ratio of their voxel counts, and the linear
  scale (cube root of the determinant) and shift (where the atlas brain's centroid lands in the
  template, RAS mm) of an affine fit of the template's mask to the atlas's. The placement rounds
  ``GRID_TO_MNI``'s half voxels, so the shift is good to 0.5 mm.

Nothing here feeds back into the pipeline: the case is for measuring only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ingest import preprocess as P
from ingest import registration as R
from model.data import preprocess
from model.data.nifti import read_nifti

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "real"
RAW = SHARED / "raw" / "TCGA-FG-6692"
BRATS = SHARED / "brats-space" / "REAL_TCGA-FG-6692"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def predicted_lesion(model, volume: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The model's lesion (any class > 0) on axial slices ``rows`` of a RAS+ grid volume."""
    import torch

    stack = preprocess.axial_slices(volume)[rows]
    out = []
    with torch.inference_mode():
        for i in range(0, len(stack), 16):
            x = torch.from_numpy(np.ascontiguousarray(stack[i:i + 16]))[:, None]
            out.append(model.draw(x).logits.argmax(1).numpy() > 0)
    return np.concatenate(out)


def template_placement() -> dict[str, float]:
    """The phantoms' MNI brain where ``GRID_TO_MNI`` puts it, against the SRI24 brain."""
    import SimpleITK as sitk

    from model.data.synth.phantom import GRID_TO_MNI
    from model.data.synth.template import load_template

    tpl = load_template()
    # Template voxel v sits at MNI v - origin; grid RAS voxel a sits at MNI a + GRID_TO_MNI.
    shift = tpl.origin + GRID_TO_MNI  # template voxel of grid voxel a is a + shift
    placed = np.zeros(R.load_atlas().t1.shape, bool)
    idx = np.indices(placed.shape).reshape(3, -1) + np.round(shift).astype(int)[:, None]
    inside = np.all((idx >= 0) & (idx < np.array(tpl.brain.shape)[:, None]), axis=0)
    flat = placed.reshape(-1)
    flat[inside] = tpl.brain[tuple(idx[:, inside])] > 0
    atlas = R.load_atlas()
    fixed = R.to_sitk(atlas.brain.astype(np.float32), R.GRID_AFFINE)
    moving = R.to_sitk(placed.astype(np.float32), R.GRID_AFFINE)
    t = R.register(fixed, moving, initial=sitk.Euler3DTransform()).Downcast()
    m = np.array(t.GetMatrix()).reshape(3, 3)  # grid (atlas) point -> template point, LPS
    centre_atlas = np.array(fixed.TransformContinuousIndexToPhysicalPoint(
        np.argwhere(atlas.brain.transpose(2, 1, 0)).mean(0)[::-1].tolist()))
    moved = np.array(t.TransformPoint(centre_atlas.tolist()))
    ras = np.diag([-1.0, -1.0, 1.0])
    return {"overlap_dice": dice(placed, atlas.brain),
            "volume_ratio": float(placed.sum() / atlas.brain.sum()),
            "linear_scale": float(abs(np.linalg.det(m)) ** (1 / 3)),
            **{f"shift_{k}_mm": float(v) for k, v in zip("xyz", ras @ (moved - centre_atlas),
                                                          strict=True)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", type=Path, default=RAW)
    ap.add_argument("--brats", type=Path, default=BRATS)
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/cbir-cpu.pt"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    pid = args.raw.name
    t1c = read_nifti(args.raw / f"{pid}_t1c.nii.gz")
    given = read_nifti(next(args.brats.glob("*_t1ce.nii*")))
    seg = read_nifti(next(args.brats.glob("*_seg.nii*")), dtype=None).array > 0

    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        out = P.to_model_space(t1c.array, t1c.affine)
        seconds.append(time.perf_counter() - started)
    theirs = given.array > 0
    both = out.brain & theirs
    print(f"brain-mask Dice                 {dice(out.brain, theirs):.3f}  (goal >= 0.90)")
    from scipy import ndimage as ndi

    smooth = [ndi.gaussian_filter(v, 2.0)[both] for v in (out.image, given.array)]
    print(f"intensity correlation in brain  "
          f"{np.corrcoef(out.image[both], given.array[both])[0, 1]:.3f} (after a 2 mm Gaussian "
          f"on both: {np.corrcoef(*smooth)[0, 1]:.3f})", flush=True)
    print(f"seconds per T1-Gd volume        {statistics.median(seconds):.1f} "
          f"(median of {args.repeats}: {', '.join(f'{s:.1f}' for s in seconds)})", flush=True)
    started = time.perf_counter()
    with_affine = P.to_model_space(t1c.array, t1c.affine, affine_stage=True)
    print(f"with the affine stage: Dice     {dice(with_affine.brain, theirs):.3f}, "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    others = {m: (v.array, v.affine) for m in ("t1", "t2", "flair")
              for v in [read_nifti(args.raw / f"{pid}_{m}.nii.gz")]}
    started = time.perf_counter()
    study = P.to_model_space(t1c.array, t1c.affine, others)
    print(f"seconds with T1, T2, FLAIR      {time.perf_counter() - started:.1f}", flush=True)
    for name, arr in study.others.items():  # masked with the T1-Gd's brain: only correlation
        print(f"  {name:5s} correlation with the T1-Gd in the brain "
              f"{np.corrcoef(arr[study.brain], study.image[study.brain])[0, 1]:+.3f}")

    from model.checkpoint import load_model

    model, _ = load_model(args.checkpoint)
    rows = np.flatnonzero(
        (preprocess.brain_area(preprocess.axial_slices(out.image)) >= preprocess.MIN_BRAIN_PIXELS)
        & (preprocess.brain_area(preprocess.axial_slices(given.array))
           >= preprocess.MIN_BRAIN_PIXELS))
    truth = preprocess.axial_slices(seg)[rows]
    for name, vol in (("preprocessed raw", out.image), ("given BraTS-space", given.array)):
        pred = predicted_lesion(model, vol, rows)
        print(f"lesion Dice, {name:18s} {dice(pred, truth):.3f} "
              f"(predicted {int(pred.sum())} px, consensus {int(truth.sum())} px, "
              f"{len(rows)} slices)", flush=True)

    placement = template_placement()
    print("phantom template (GRID_TO_MNI) vs SRI24 brain: "
          + ", ".join(f"{k} {v:.3f}" for k, v in placement.items()))


if __name__ == "__main__":
    main()
