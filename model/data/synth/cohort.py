"""``cbir synth``: write a synthetic BraTS-layout cohort, one patient folder at a time, atomically.

Each patient is rendered into a hidden temporary folder, its files fsynced, and the folder renamed
into place with ``os.replace``: a folder named ``<PID>`` is always complete. Re-running skips the
patients already there and removes temporary folders an interrupted run left behind.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from model.atomic import fsync_dir
from model.data.synth.phantom import BRATS_AFFINE, render_patient
from model.data.synth.structures import template_structures
from model.data.synth.template import load_template

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
FILES = {"image": "t1ce", "seg": "seg", "healthy": "healthy", "anatomy": "anatomy",
         "tissue": "tissue"}


def patient_id(seed: int, n: int) -> str:
    """Ids differ between seeds, so cohorts made with different seeds can be indexed together."""
    return f"SYN{seed}_{n:04d}"


@dataclass
class SynthReport:
    written: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    lesion_counts: dict[str, int] = field(default_factory=dict)  # pid -> lesions (written only)
    seconds: float = 0.0

    @property
    def fraction_without_lesion(self) -> float:
        n = len(self.lesion_counts)
        return sum(v == 0 for v in self.lesion_counts.values()) / n if n else 0.0


def _to_brats_storage(ras: np.ndarray) -> np.ndarray:
    """RAS+ voxel order -> the LPS order BraTS files are stored in (see ``BRATS_AFFINE``)."""
    return np.ascontiguousarray(ras[::-1, ::-1, :])


def _write_patient(out: Path, seed: int, n: int, structures: bool = True) -> tuple[str, dict]:
    pid = patient_id(seed, n)
    arrays = render_patient(np.random.SeedSequence([seed, n]), load_template(),
                            structures=structures)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{pid}-", dir=out))
    try:
        for key, suffix in FILES.items():
            img = nib.Nifti1Image(_to_brats_storage(arrays[key]), BRATS_AFFINE)
            img.header.set_xyzt_units("mm")
            path = tmp / f"{pid}_{suffix}.nii.gz"
            nib.save(img, path)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        (tmp / "synth.json").write_text(json.dumps({"seed": seed, "n": n,
                                                    "structures": structures,
                                                    **arrays["summary"]}))
        fsync_dir(tmp)
        os.replace(tmp, out / pid)
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pid, arrays["summary"]


def _one_thread() -> None:
    """A worker process renders with one torch thread: the workers are the parallelism."""
    torch.set_num_threads(1)


def synthesize(out: Path | str, patients: int, seed: int, workers: int = 1,
               progress: bool = True, structures: bool = True) -> SynthReport:
    """Write ``patients`` synthetic patients under ``out``; see the module docstring.

    ``structures`` False leaves out the normal tissue that enhances (``structures.py``): an
    ablation, to measure what those structures change."""
    if patients < 1:
        raise ValueError(f"--patients must be at least 1, got {patients}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    report = SynthReport()
    todo = []
    for n in range(patients):
        if (out / patient_id(seed, n)).is_dir():
            report.skipped_existing.append(patient_id(seed, n))
        else:
            todo.append(n)
    start = time.perf_counter()
    load_template()  # once, before forking: workers inherit it
    template_structures()
    bar = tqdm(total=len(todo), desc="synthesising", unit="patient", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for n in todo:
                pid, summary = _write_patient(out, seed, n, structures)
                report.written.append(pid)
                report.lesion_counts[pid] = summary["lesions"]
                bar.update()
        else:
            ctx = mp.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=_one_thread) as pool:
                futures = [pool.submit(_write_patient, out, seed, n, structures) for n in todo]
                for fut in as_completed(futures):
                    pid, summary = fut.result()
                    report.written.append(pid)
                    report.lesion_counts[pid] = summary["lesions"]
                    bar.update()
    finally:
        bar.close()
    report.written.sort()
    report.seconds = time.perf_counter() - start
    return report
