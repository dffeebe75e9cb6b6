"""The commands on a BraTS 2023 folder and a Decathlon folder: ``index build`` and ``eval`` read
them; ``data check`` names their layouts; an empty folder makes ``index build``, ``eval``,
``train`` and ``data check`` fail saying what they looked for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model.checkpoint import save_checkpoint
from model.config import preset
from model.network import DecompositionNet
from service.cli import app
from tests.ingest.writers import brats2023_patient, msd_case

runner = CliRunner()
GRID = (48, 48, 6)  # centre-padded to 256 x 256 slices; each brain slice > MIN_BRAIN_PIXELS


def _brain(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic brain (about 1,400 pixels a slice) with a lesion in slices 2..4: an enhancing
    rim (ET) around a core (TC), edema (ED) outside; slices 0, 1 and 5 are lesion-free."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    inside = ((x - 24) / 20) ** 2 + ((y - 24) / 22) ** 2 < 1
    image = np.zeros(GRID, np.float32)
    labels = np.zeros(GRID, np.uint8)
    cx, cy = 16 + 4 * seed, 20
    r = np.hypot(x - cx, y - cy)
    for z in range(GRID[2]):
        image[..., z] = np.where(inside, rng.uniform(200, 400, inside.shape), 0)
        if 2 <= z <= 4:
            labels[..., z][inside & (r < 9)] = 2
            labels[..., z][inside & (r < 5)] = 4
            labels[..., z][inside & (r < 3)] = 1
    image[labels == 4] = 700.0
    image[labels == 1] = 80.0
    return image, labels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained `tiny` model: reading, indexing and scoring hold for any weights, and it
    draws in a fraction of the shipped model's time."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, DecompositionNet(preset("tiny")).eval(), "tiny")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """References: two patients in each layout; queries: one more in each."""
    root = tmp_path_factory.mktemp("layouts")
    for i in range(2):
        brats2023_patient(root / "brats2023", f"BraTS-GLI-0000{i}-000", *_brain(i))
        msd_case(root / "Task01_BrainTumour", f"BRATS_00{i + 1}", *_brain(i + 2))
    brats2023_patient(root / "queries-2023", "BraTS-GLI-00009-000", *_brain(1))
    msd_case(root / "queries-Task01", "BRATS_009", *_brain(2))
    return {"brats2023": root / "brats2023", "msd": root / "Task01_BrainTumour",
            "brats2023 queries": root / "queries-2023", "msd queries": root / "queries-Task01"}


def test_data_check_names_the_layouts(folders):
    result = runner.invoke(app, ["data", "check", str(folders["brats2023"]), str(folders["msd"])])
    assert result.exit_code == 0, result.output
    assert "4 patients readable (2 brats2023, 2 msd), 24 brain slices, 12 with abnormality" \
        in result.output


def test_index_build_and_eval_read_both_layouts(folders, checkpoint, tmp_path):
    index = tmp_path / "index"
    result = runner.invoke(app, ["index", "build", "--data", str(folders["brats2023"]),
                                 "--data", str(folders["msd"]), "--out", str(index),
                                 "--workers", "0", "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", "--index", str(index),
                                 "--queries", str(folders["brats2023 queries"]),
                                 "--queries", str(folders["msd queries"]), "--out", str(out),
                                 "--k", "1,2", "--max-queries", "8", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    assert data["index"]["slices"] == 24 and data["references"]["slices_with_lesion"] == 12
    assert {pid: p["with_lesion"] for pid, p in data["queries"]["patients"].items()} == {
        "BRATS_009": 2, "BraTS-GLI-00009-000": 2}
    assert data["queries"]["slices"] == 8 and data["queries"]["with_lesion"] == 4
    # Every class of the source reached ours: each query lesion slice holds TC, ED and ET.
    for name in ("tc_dice", "ed_dice", "et_dice"):
        assert data["figures"]["abnormal"][name]["queries"] == 4, name
    # What matters on real data is printed as eval.json holds it.
    abnormal = data["figures"]["abnormal"]
    for name in ("healthy_precision", "lesion_precision"):
        value = abnormal[name]["at_k"]["2"]["model"]["value"]
        assert f"abnormal {name:<18} {value:.3f} |" in result.output
    model = data["model"]
    for name in ("segmentation_dice_tc", "segmentation_dice_ed", "segmentation_dice_et",
                 "segmentation_dice_whole", "reconstruction_ssim_brain"):
        value, slices = model[name]["value"], model[name]["slices"]
        shown = "-" if value is None else f"{value:.3f}"
        assert f"  {name:<26} {shown} ({slices})" in result.output
        assert data["headline"]["model"][name]["slices"] == slices
    assert model["segmentation_dice_whole"]["slices"] >= 4  # every lesion slice at least
    dice = " / ".join("-" if model[f"segmentation_dice_{c}"]["value"] is None else
                      f"{model[f'segmentation_dice_{c}']['value']:.3f}"
                      for c in ("tc", "ed", "et", "whole"))
    assert (f"headline (abnormal space, top-2): lesion-free precision "
            f"{abnormal['healthy_precision']['at_k']['2']['model']['value']:.3f}, lesion "
            f"precision {abnormal['lesion_precision']['at_k']['2']['model']['value']:.3f}; "
            f"segmentation Dice TC / ED / ET / whole {dice}; reconstruction SSIM in the brain "
            f"{model['reconstruction_ssim_brain']['value']:.3f}") in result.output


def _says_what_it_looked_for(output: str, folder: Path) -> None:
    assert f"no usable case under {folder}: looked for" in output
    assert "<ID>/<ID>-t1c.nii[.gz] (BraTS 2023-2025)" in output
    assert "imagesTr|imagesTs/<ID>.nii[.gz]" in output


def test_an_empty_folder_fails_every_command_saying_what_it_looked_for(folders, checkpoint,
                                                                      tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["index", "build", "--data", str(empty), "--out",
                                 str(tmp_path / "index"), "--workers", "0"])
    assert result.exit_code != 0
    _says_what_it_looked_for(result.output, empty)
    assert not (tmp_path / "index").exists()
    result = runner.invoke(app, ["data", "check", str(empty)])
    assert result.exit_code != 0
    _says_what_it_looked_for(result.output, empty)
    result = runner.invoke(app, ["train", "--data", str(empty), "--out", str(tmp_path / "m.pt"),
                                 "--steps", "1"])
    assert result.exit_code != 0
    _says_what_it_looked_for(result.output, empty)
    assert not (tmp_path / "m.pt").exists()
    index = tmp_path / "built"
    assert runner.invoke(app, ["index", "build", "--data", str(folders["msd queries"]), "--out",
                               str(index), "--workers", "0", "--checkpoint",
                               str(checkpoint)]).exit_code == 0
    result = runner.invoke(app, ["eval", "--index", str(index), "--queries", str(empty),
                                 "--out", str(tmp_path / "r"), "--k", "1"])
    assert result.exit_code == 2
    _says_what_it_looked_for(result.output, empty)


def test_a_folder_of_unreadable_cases_builds_no_index(checkpoint, tmp_path):
    folder = tmp_path / "broken"
    brats2023_patient(folder, "BraTS-GLI-00000-000")
    (folder / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1c.nii.gz").write_bytes(b"junk")
    result = runner.invoke(app, ["index", "build", "--data", str(folder), "--out",
                                 str(tmp_path / "index"), "--workers", "0", "--checkpoint",
                                 str(checkpoint)])
    assert result.exit_code != 0
    assert "no usable case: every patient found was skipped" in result.output
    assert "BraTS-GLI-00000-000-t1c.nii.gz: not a readable NIfTI file" in result.output
