"""model.data.dataset: slice items from a real (synthetic) cohort, skipped patients, batching."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ingest.layouts import find_cases
from ingest.volumes import load_case
from model.data import preprocess
from model.data.dataset import SliceDataset

LABEL_OF_CLASS = {0: 0, 1: 1, 2: 2, 3: 4}


@pytest.fixture(scope="module")
def dataset(synth_cohort) -> SliceDataset:
    return SliceDataset.from_folders([synth_cohort])


@pytest.fixture(scope="module")
def items(dataset) -> list[dict]:
    """Every item's pid, slice index and lesion pixel count (not the arrays: ~1.5 MB each)."""
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        out.append({"pid": item["pid"], "slice_index": item["slice_index"], "index": i,
                    "lesion": int(np.count_nonzero(item["abnormal"].numpy()))})
    return out


def _copy_patient(synth_cohort: Path, pid: str, dest_root: Path) -> Path:
    dest = dest_root / pid
    shutil.copytree(synth_cohort / pid, dest)
    return dest


def test_dataset_items(dataset):
    assert len(dataset) > 0
    assert dataset.skipped == []
    pids = set()
    for i in range(len(dataset)):
        item = dataset[i]
        assert set(item) == {"image", "abnormal", "has_seg", "anatomy", "healthy", "pid",
                             "slice_index", "tissue", "has_tissue"}
        # Tissue maps are loaded only when asked for (training with --render).
        assert not item["has_tissue"] and not item["tissue"].any()
        assert item["image"].shape == (1, 256, 256) and item["image"].dtype == torch.float32
        assert item["abnormal"].shape == (256, 256) and item["abnormal"].dtype == torch.int64
        assert item["anatomy"].shape == (256, 256) and item["anatomy"].dtype == torch.int64
        assert item["healthy"].shape == (1, 256, 256) and item["healthy"].dtype == torch.float32
        image, abnormal = item["image"].numpy(), item["abnormal"].numpy()
        anatomy, healthy = item["anatomy"].numpy(), item["healthy"].numpy()
        assert image.min() >= 0 and image.max() <= 1
        assert abnormal.min() >= 0 and abnormal.max() <= 3
        assert anatomy.min() >= 0 and anatomy.max() <= 6
        assert healthy.min() >= 0 and healthy.max() <= 1
        assert item["has_seg"] is True
        assert isinstance(item["pid"], str) and item["pid"].startswith("SYN3_")
        assert type(item["slice_index"]) is int
        assert int(preprocess.brain_area(image[0])) >= preprocess.MIN_BRAIN_PIXELS
        pids.add(item["pid"])
    assert pids == {f"SYN3_{i:04d}" for i in range(4)}


def test_dataset_keeps_exactly_the_brain_slices(synth_cohort, items):
    counts = Counter(item["pid"] for item in items)
    for case in find_cases(synth_cohort).cases:
        vols = load_case(case, with_healthy=False)
        areas = preprocess.brain_area(preprocess.axial_slices(vols.image))
        keep = np.flatnonzero(areas >= preprocess.MIN_BRAIN_PIXELS)
        assert 0 < len(keep) < len(areas)
        indices = [it["slice_index"] for it in items if it["pid"] == case.pid]
        assert indices == keep.tolist()
        assert counts[case.pid] == len(keep)


def test_abnormal_classes_match_seg_labels(synth_cohort, dataset, items):
    lesioned = [it for it in items if it["lesion"] > 0]
    assert lesioned
    # The slice with the most lesion pixels, so that several classes are compared.
    best = max(lesioned, key=lambda it: it["lesion"])
    item = dataset[best["index"]]
    (case,) = [c for c in find_cases(synth_cohort).cases if c.pid == item["pid"]]
    vols = load_case(case, with_healthy=False)
    z = item["slice_index"]
    seg = preprocess.axial_slices(vols.seg)[z]
    image = preprocess.axial_slices(vols.image)[z]
    abnormal = item["abnormal"].numpy()
    assert np.array_equal(item["image"][0].numpy(), image)
    assert len(np.unique(abnormal)) >= 3  # background and at least two lesion classes
    for cls, label in LABEL_OF_CLASS.items():
        assert np.array_equal(abnormal == cls, seg == label), (cls, label)
    anatomy = preprocess.axial_slices(vols.anatomy)[z]
    assert np.array_equal(item["anatomy"].numpy(), anatomy.astype(np.int64))


def test_truncated_patient_is_skipped(synth_cohort, tmp_path):
    root = tmp_path / "cohort"
    _copy_patient(synth_cohort, "SYN3_0000", root)
    bad = _copy_patient(synth_cohort, "SYN3_0001", root)
    t1ce = bad / "SYN3_0001_t1ce.nii.gz"
    data = t1ce.read_bytes()
    t1ce.write_bytes(data[: len(data) // 2])

    ds = SliceDataset.from_folders([root])
    assert len(ds) > 0
    assert {ds[i]["pid"] for i in range(len(ds))} == {"SYN3_0000"}
    assert len(ds.skipped) == 1
    path, reason = ds.skipped[0]
    assert path == t1ce
    assert reason.startswith("truncated or corrupt data")


def test_scan_skips_are_listed_too(synth_cohort, tmp_path):
    root = tmp_path / "cohort"
    _copy_patient(synth_cohort, "SYN3_0000", root)
    bad = _copy_patient(synth_cohort, "SYN3_0002", root)
    (bad / "SYN3_0002_t1ce.nii.gz").unlink()
    ds = SliceDataset.from_folders([root])
    assert ds.skipped == [(bad, "missing SYN3_0002_t1ce.nii.gz (or SYN3_0002-t1c.nii.gz)")]
    assert len(ds) > 0


def test_patient_without_seg(synth_cohort, tmp_path):
    root = tmp_path / "cohort"
    folder = _copy_patient(synth_cohort, "SYN3_0003", root)
    for kind in ("seg", "anatomy", "healthy"):  # like a BraTS validation case
        (folder / f"SYN3_0003_{kind}.nii.gz").unlink()
    ds = SliceDataset.from_folders([root])
    assert len(ds) > 0
    assert ds.skipped == []
    for i in range(len(ds)):
        item = ds[i]
        assert item["has_seg"] is False
        assert item["abnormal"].dtype == torch.int64
        assert not item["abnormal"].any()
        assert item["anatomy"].dtype == torch.int64
        assert (item["anatomy"] == -1).all()
        assert item["healthy"].shape == (1, 256, 256)
        assert (item["healthy"] == -1).all()
        assert item["image"].max() > 0


def test_dataloader_default_collate(dataset):
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 256, 256)
    assert batch["image"].dtype == torch.float32
    assert batch["abnormal"].shape == (4, 256, 256)
    assert batch["abnormal"].dtype == torch.int64
    assert batch["anatomy"].shape == (4, 256, 256)
    assert batch["healthy"].shape == (4, 1, 256, 256)
    assert batch["has_seg"].tolist() == [True] * 4
    assert len(batch["pid"]) == 4 and all(p.startswith("SYN3_") for p in batch["pid"])
    assert batch["slice_index"].shape == (4,)
    first = dataset[0]
    assert torch.equal(batch["image"][0], first["image"])
    assert batch["slice_index"][0].item() == first["slice_index"]


def test_tissue_slabs_hold_the_levels_around_each_slice(synth_cohort):
    """With ``slab_half``, an item's ``tissue_slab`` is its patient's tissue levels around it, in
    order, centre = ``tissue``; levels not stored are background."""
    cases = find_cases(synth_cohort).cases[:1]
    plain = SliceDataset(cases, tissue=True)
    slabbed = SliceDataset(cases, tissue=True, slab_half=3)
    assert "tissue_slab" not in plain[0]
    by_level = {plain[i]["slice_index"]: plain[i]["tissue"] for i in range(len(plain))}
    assert len(slabbed) == len(plain)
    for i in (0, len(slabbed) // 2, len(slabbed) - 1):
        item = slabbed[i]
        assert item["tissue_slab"].shape == (7, 256, 256)
        assert item["tissue_slab"].dtype == torch.uint8
        torch.testing.assert_close(item["tissue_slab"][3], item["tissue"])
        for k, level in enumerate(range(item["slice_index"] - 3, item["slice_index"] + 4)):
            expected = by_level.get(level, torch.zeros(256, 256, dtype=torch.uint8))
            torch.testing.assert_close(item["tissue_slab"][k], expected)
    # The first stored slice has no stored level below it.
    assert not slabbed[0]["tissue_slab"][0].any()
    # Without tissue maps there is no slab to give.
    assert "tissue_slab" not in SliceDataset(cases, slab_half=3)[0]
