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
  preprocessed raw case and on the given BraTS-space volume, and on how many label-free and
  labelled slices it draws any lesion;
- how the synthetic phantoms' MNI template lies against the SRI24 brain (``--placement`` prints
  only this): Dice of the two brain masks and the ratio of their voxel counts at the nominal
  placement (``GRID_TO_MNI``) and at the one patients are drawn around, and the best shift and
  scale of a grid search (atlas and template only: no real case is read for it).

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


def _placed_template(shift_mm, scale: float, step: int = 1) -> np.ndarray:
    """The MNI template's brain mask on the grid, read at (p + shift_mm) * scale for grid mm p."""
    from scipy import ndimage as ndi

    from model.data.synth.phantom import GRID_SHAPE, GRID_TO_MNI
    from model.data.synth.template import load_template

    tpl = load_template()
    g = np.indices(GRID_SHAPE)[:, ::step, ::step, ::step]
    shape = g.shape[1:]
    mm = g.reshape(3, -1).astype(np.float32) + (GRID_TO_MNI + np.asarray(shift_mm))[:, None]
    inside = ndi.map_coordinates((tpl.brain > 0).astype(np.float32),
                                 mm * scale + tpl.origin[:, None], order=1) > 0.5
    return inside.reshape(shape)


def template_placement() -> dict[str, float]:
    """Where the phantoms' MNI brain sits against the SRI24 brain on the grid: Dice and volume
    ratio at the nominal placement (``GRID_TO_MNI``) and at the one patients are drawn around
    (``SRI24_SHIFT_MM``, ``SRI24_SCALE``), and the best of a grid search at 2 mm (the search
    that chose those constants; atlas and template only)."""
    from model.data.synth.phantom import SRI24_SCALE, SRI24_SHIFT_MM

    atlas = R.load_atlas().brain
    out = {}
    for name, shift, scale in (("nominal", (0, 0, 0), 1.0),
                               ("drawn_around", SRI24_SHIFT_MM, SRI24_SCALE)):
        placed = _placed_template(shift, scale)
        out[f"{name}_dice"] = dice(placed, atlas)
        out[f"{name}_volume_ratio"] = float(placed.sum() / atlas.sum())
    coarse = atlas[::2, ::2, ::2]
    found = max((dice(_placed_template((-0.4, dy, dz), k, step=2), coarse), dy, dz, k)
                for dy in (5, 7, 9, 11, 13) for dz in (0, 2, 4, 6) for k in (1.04, 1.06, 1.08, 1.1))
    out.update(search_dice_2mm=found[0], search_shift_y_mm=found[1], search_shift_z_mm=found[2],
               search_scale=found[3])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", type=Path, default=RAW)
    ap.add_argument("--brats", type=Path, default=BRATS)
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/cbir-cpu.pt"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--interpolations", default="linear",
                    help="comma-separated step-5 interpolations (ingest.preprocess."
                         "INTERPOLATIONS: linear, bspline, lanczos); every figure uses the first, "
                         "and correlation and the model's lesion Dice are printed for the others")
    ap.add_argument("--placement", action="store_true",
                    help="only the template placement against SRI24 (no real case read)")
    args = ap.parse_args()
    if args.placement:
        _print_placement()
        return
    pid = args.raw.name
    t1c = read_nifti(args.raw / f"{pid}_t1c.nii.gz")
    given = read_nifti(next(args.brats.glob("*_t1ce.nii*")))
    seg = read_nifti(next(args.brats.glob("*_seg.nii*")), dtype=None).array > 0

    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        out = P.to_model_space(t1c.array, t1c.affine,
                               interpolation=args.interpolations.split(",")[0])
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
    labelled = truth.any(axis=(1, 2))
    volumes = [("preprocessed raw", out.image), ("given BraTS-space", given.array)]
    for name in args.interpolations.split(",")[1:]:
        other = P.to_model_space(t1c.array, t1c.affine, interpolation=name)
        smooth = [ndi.gaussian_filter(v, 2.0)[both] for v in (other.image, given.array)]
        print(f"step 5 {name}: correlation in brain "
              f"{np.corrcoef(other.image[both], given.array[both])[0, 1]:.3f} (2 mm Gaussian: "
              f"{np.corrcoef(*smooth)[0, 1]:.3f})", flush=True)
        volumes.append((f"raw, {name}", other.image))
    for name, vol in volumes:
        pred = predicted_lesion(model, vol, rows)
        drawn = pred.any(axis=(1, 2))
        print(f"lesion Dice, {name:18s} {dice(pred, truth):.3f} "
              f"(predicted {int(pred.sum())} px, {int((pred & truth).sum())} of them on the "
              f"consensus {int(truth.sum())} px, {len(rows)} slices); a lesion drawn on "
              f"{int(drawn[~labelled].sum())} of {int((~labelled).sum())} label-free and "
              f"{int(drawn[labelled].sum())} of {int(labelled.sum())} labelled slices", flush=True)

    _print_placement()


def _print_placement() -> None:
    print("phantom template vs SRI24 brain: "
          + ", ".join(f"{k} {v:.3f}" for k, v in template_placement().items()), flush=True)


if __name__ == "__main__":
    main()
