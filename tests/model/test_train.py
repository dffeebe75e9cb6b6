"""Training: a tiny run lowers the loss, logs its metrics, and resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model.checkpoint import read_checkpoint
from model.config import preset
from model.losses import LossWeights
from model.network import DecompositionNet
from model.train import TrainConfig, TrainingError, augment, split_patients, train


@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory):
    """Two patients with lesions: one to train on, one held out."""
    root = tmp_path_factory.mktemp("train_cohort")
    for pid in ("SYN1_0000", "SYN1_0001"):
        shutil.copytree(synth_cohort / pid, root / pid)
    return root


def _records(out) -> list[dict]:
    with open(f"{out}.metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def _config(epochs: int) -> TrainConfig:
    return TrainConfig(preset="tiny", epochs=epochs, batch_size=4, lr=2e-3, seed=0,
                       val_fraction=0.5, max_steps_per_epoch=5, weights=LossWeights(rec=5.0))


@pytest.fixture(scope="module")
def two_epochs(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny.pt"
    result = train([cohort], out, _config(2), progress=False)
    return out, result


def test_tiny_run_lowers_the_total_loss(two_epochs):
    out, _ = two_epochs
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["loss"]["total"] < records[0]["loss"]["total"]


def test_metrics_log_has_every_term_and_held_out_metric(two_epochs):
    out, result = two_epochs
    record = _records(out)[-1]
    assert set(record["loss"]) >= {"total", "lat", "dis", "seg", "rec", "res"}
    for book in ("codebook_normal", "codebook_abnormal"):
        assert 1 <= record[book]["perplexity"] <= 512
        assert 0 < record[book]["used_fraction"] <= 1
    held = record["held_out"]
    assert -1 <= held["ssim_reconstruction"] <= 1
    assert held["ssim_pseudo_normal_in_lesion"] is not None
    assert held["ssim_pseudo_normal_outside_lesion"] is not None
    assert {"dice_TC", "dice_ED", "dice_ET"} <= set(held)
    assert result["train_slices"] > 0 and result["held_out_slices"] > 0


def test_checkpoint_records_what_it_was_made_from(two_epochs):
    out, _ = two_epochs
    payload = read_checkpoint(out)
    assert payload["epoch"] == 1 and payload["preset"] == "tiny"
    assert len(payload["data_fingerprint"]) == 64
    assert payload["train_config"]["lr"] == 2e-3
    assert len(payload["held_out_patients"]) == 1


def test_resume_continues_exactly(cohort, two_epochs, tmp_path):
    out, _ = two_epochs
    part = tmp_path / "part.pt"
    train([cohort], part, _config(1), progress=False)
    result = train([cohort], part, _config(2), resume=True, progress=False)
    assert result["start_epoch"] == 1
    assert read_checkpoint(part)["weights_sha256"] == read_checkpoint(out)["weights_sha256"]
    assert len(_records(part)) == 2


def test_resume_refuses_another_preset(cohort, two_epochs, tmp_path):
    out, _ = two_epochs
    copy = tmp_path / "copy.pt"
    shutil.copy(out, copy)
    config = _config(3)
    config.preset = "small"
    with pytest.raises(TrainingError, match="is a 'tiny' checkpoint, this run asks for 'small'"):
        train([cohort], copy, config, resume=True, progress=False)


def test_existing_checkpoint_is_not_overwritten_without_resume(cohort, two_epochs):
    out, _ = two_epochs
    with pytest.raises(TrainingError, match="exists: pass --resume"):
        train([cohort], out, _config(1), progress=False)


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no patient with a t1ce image under"):
        train([tmp_path / "empty"], tmp_path / "m.pt", _config(1), progress=False)


def test_split_is_by_patient_and_seeded():
    pids = [f"P{i}" for i in range(20)]
    a = split_patients(pids, 0.1, seed=0)
    assert len(a) == 2 and a == split_patients(list(reversed(pids)), 0.1, seed=0)
    assert split_patients(pids, 0.1, seed=1) != a or len(pids) < 3
    assert split_patients(["only"], 0.5, seed=0) == set()


def test_augmentation_moves_image_and_labels_together():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(6, 1, 256, 256)
    labels = torch.zeros(6, 256, 256, dtype=torch.long)
    image[:, :, 60:100, 150:190] = 1.0
    labels[:, 60:100, 150:190] = 3
    out = augment({"image": image, "abnormal": labels}, g)
    assert set(out["abnormal"].unique().tolist()) <= {0, 3}
    moved = (out["abnormal"] != labels).flatten(1).any(1)
    assert moved.all()
    # Where the label moved, the bright square moved with it.
    inside = out["abnormal"] == 3
    assert out["image"][:, 0][inside].mean() > 0.9
    assert out["image"][:, 0][~inside].mean() < 0.01


def test_model_config_travels_in_checkpoint(two_epochs):
    out, _ = two_epochs
    payload = read_checkpoint(out)
    net = DecompositionNet(preset("tiny"))
    net.load_state_dict(payload["model"])
