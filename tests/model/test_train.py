"""Training: a tiny run logs held-out figures, stops on a budget, and resumes exactly."""

from __future__ import annotations

import fcntl
import json
import math
import shutil

import pytest
import torch

from model.checkpoint import export_checkpoint, read_checkpoint
from model.config import preset
from model.losses import LossWeights
from model.network import DecompositionNet
from model.train import (
    TrainConfig,
    TrainingError,
    augment,
    learning_rate,
    split_patients,
    train,
)


@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory):
    """Three patients: one to train on, two held out (held-out retrieval excludes the query's
    own patient, so it needs two)."""
    root = tmp_path_factory.mktemp("train_cohort")
    for pid in ("SYN3_0000", "SYN3_0001", "SYN3_0002"):
        shutil.copytree(synth_cohort / pid, root / pid)
    return root


def _records(out) -> list[dict]:
    with open(f"{out}.metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def _config(steps: int = 8, **changes) -> TrainConfig:
    values = dict(preset="tiny", steps=steps, batch_size=4, lr=2e-3, min_lr=1e-4,
                  warmup_steps=2, eval_every=4, eval_slices=24, seed=0, val_fraction=0.67,
                  weights=LossWeights(rec=5.0))
    return TrainConfig(**(values | changes))


@pytest.fixture(scope="module")
def full_run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny.pt"
    result = train([cohort], out, _config(), progress=False)
    return out, result


def test_run_evaluates_before_training_and_every_eval_every_steps(full_run):
    out, result = full_run
    records = _records(out)
    assert [r["step"] for r in records] == [0, 4, 8]
    assert result["finished"] and result["step"] == 8
    assert records[-1]["train_loss"]["total"] < records[1]["train_loss"]["total"] * 1.5
    assert out.with_name("tiny.pt.curves.png").stat().st_size > 10_000


def test_metrics_log_has_every_term_and_held_out_figure(full_run):
    out, result = full_run
    record = _records(out)[-1]
    assert set(record["train_loss"]) >= {"total", "lat", "dis", "seg", "rec", "res",
                                         "commit_normal", "commit_abn_lesion"}
    held = record["held_out"]
    for key in ("rec_ssim_brain", "pn_ssim_in", "pn_ssim_out"):
        assert -1 <= held[key] <= 1
    for key in ("pn_mae_in", "pn_mae_out", "input_mae_in", "dice_TC", "dice_ED", "dice_ET",
                "dice_whole", "abn_lesion_at5", "abn_clean_at5", "normal_twin_at5"):
        assert 0 <= held[key] <= 1, key
    assert 1 <= held["cb_normal"]["perplexity"] <= 512
    assert 0 < held["score"] <= 7
    assert held["slices"] == 24 < result["held_out_slices"]  # eval_slices, evenly spaced
    assert result["train_slices"] > 0 and result["held_out_slices"] > 0


def test_checkpoint_records_what_it_was_made_from(full_run):
    out, _ = full_run
    payload = read_checkpoint(out)
    assert payload["step"] == 8 and payload["preset"] == "tiny"
    assert len(payload["data_fingerprint"]) == 64
    assert payload["train_config"]["lr"] == 2e-3
    assert payload["train_config"]["weights"]["rec"] == 5.0
    assert len(payload["held_out_patients"]) == 2
    assert payload["train_seconds"] > 0 and "CPU" in payload["hardware"]


def test_best_checkpoint_has_the_best_held_out_score(full_run):
    out, result = full_run
    best = read_checkpoint(result["best_path"])
    scores = [r["held_out"]["score"] for r in _records(out)]
    assert best["metrics"]["held_out"]["score"] == max(scores)
    assert "optimizer" not in best


def test_a_run_split_by_resume_equals_an_uninterrupted_one(cohort, full_run, tmp_path):
    out, _ = full_run
    part = tmp_path / "part.pt"
    first = train([cohort], part, _config(), progress=False, minutes=1e-9)
    assert not first["finished"] and first["step"] == 1  # the budget stops it after one step
    train([cohort], part, _config(), progress=False, resume=True)
    again = read_checkpoint(part)
    assert again["step"] == 8
    # Stopped, evaluated and resumed: the same batches, draws and schedule as in one run.
    reference = read_checkpoint(out)
    for name, tensor in reference["model"].items():
        assert torch.allclose(again["model"][name].float(), tensor.float(), atol=1e-5), name


def test_resume_refuses_another_recipe_or_preset(cohort, full_run, tmp_path):
    out, _ = full_run
    copy = tmp_path / "copy.pt"
    shutil.copy(out, copy)
    with pytest.raises(TrainingError, match=r"other settings \(lr 0.002 -> 0.001\)"):
        train([cohort], copy, _config(lr=1e-3), resume=True, progress=False)
    with pytest.raises(TrainingError, match="is a 'tiny' checkpoint, this run asks for 'small'"):
        train([cohort], copy, _config(preset="small"), resume=True, progress=False)
    exported = tmp_path / "exported.pt"
    export_checkpoint(copy, exported)
    with pytest.raises(TrainingError, match="no training state"):
        train([cohort], exported, _config(), resume=True, progress=False)


def test_existing_checkpoint_is_not_overwritten_without_resume(cohort, full_run):
    out, _ = full_run
    with pytest.raises(TrainingError, match="exists: pass --resume"):
        train([cohort], out, _config(), progress=False)


def test_a_second_run_on_the_same_checkpoint_is_refused_while_the_first_holds_it(cohort,
                                                                                   tmp_path):
    out = tmp_path / "m.pt"
    lock = tmp_path / "m.pt.lock"
    with open(lock, "w") as fh:  # what a running `cbir train --out m.pt` holds
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingError, match="another cbir train is writing"):
            train([cohort], out, _config(steps=2), progress=False)
        assert not out.exists()
    # a run that stops on an error frees it (one that ends well does too: every --resume of
    # a checkpoint this process wrote, as in the tests above, takes it again)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no usable case"):
        train([tmp_path / "empty"], out, _config(steps=2), progress=False)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no usable case under .*looked for"):
        train([tmp_path / "empty"], tmp_path / "m.pt", _config(), progress=False)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    config = TrainConfig(steps=1000, lr=1e-3, min_lr=5e-5, warmup_steps=100)
    assert math.isclose(learning_rate(config, 0), 1e-4)
    assert math.isclose(learning_rate(config, 100), 1e-3)
    assert math.isclose(learning_rate(config, 1000), 5e-5)
    assert math.isclose(learning_rate(config, 5000), 5e-5)
    rates = [learning_rate(config, s) for s in range(100, 1001, 50)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    midway = learning_rate(config, 550)
    assert math.isclose(midway, (1e-3 + 5e-5) / 2)


def test_train_config_round_trips():
    config = _config(lesion_codebook=False, bf16=False)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(TrainingError, match="unknown training settings.*colour"):
        TrainConfig.from_dict({**config.to_dict(), "colour": "blue"})


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


def test_model_config_travels_in_checkpoint(full_run):
    out, _ = full_run
    payload = read_checkpoint(out)
    net = DecompositionNet(preset("tiny"))
    net.load_state_dict(payload["model"])


def test_warm_start_begins_from_the_checkpoints_weights(cohort, full_run, tmp_path):
    out, _ = full_run
    warm = tmp_path / "warm.pt"
    train([cohort], warm, _config(steps=4, init_from=str(out)), progress=False)
    # The step-0 evaluation of the warm run is the source's last one: same weights, same slices.
    assert _records(warm)[0]["held_out"] == _records(out)[-1]["held_out"]
    payload = read_checkpoint(warm)
    assert payload["step"] == 4 and payload["train_config"]["init_from"] == str(out)
    with pytest.raises(TrainingError, match="cannot start from .*is a 'tiny' checkpoint, "
                                            "this run trains 'small'"):
        train([cohort], tmp_path / "other.pt", _config(preset="small", init_from=str(out)),
              progress=False)
    with pytest.raises(TrainingError, match="cannot start from .*not found"):
        train([cohort], tmp_path / "none.pt", _config(init_from=str(tmp_path / "missing.pt")),
              progress=False)


def test_retrieval_margin_run_logs_its_term_and_resumes_exactly(cohort, tmp_path):
    config = _config(weights=LossWeights(rec=5.0, sep=1.0))
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    train([cohort], whole, config, progress=False)
    assert _records(whole)[-1]["train_loss"]["sep"] >= 0
    assert read_checkpoint(whole)["margin_bank"]["codes"].shape[0] > 0
    train([cohort], part, config, progress=False, minutes=1e-9)
    train([cohort], part, config, progress=False, resume=True)
    # The bank of recent codes travels in the checkpoint: the split run is the same run.
    a, b = read_checkpoint(whole)["model"], read_checkpoint(part)["model"]
    for name, tensor in a.items():
        assert torch.allclose(b[name].float(), tensor.float(), atol=1e-5), name


def test_null_by_slice_and_gate_warm_started_from_a_run_without_them(cohort, full_run,
                                                                     tmp_path):
    out, _ = full_run
    warm = tmp_path / "null.pt"
    train([cohort], warm, _config(steps=4, init_from=str(out), null_code=True,
                                  null_by_slice=True, abnormal_gate=True), progress=False)
    payload = read_checkpoint(warm)
    assert payload["config"]["abnormal_null_code"] is True
    assert payload["config"]["abnormal_gate"] is True  # the gate was added to the source's
    assert payload["model"]["encoder.abnormal_gate.weight"].shape[0] == 1
    with pytest.raises(TrainingError, match="weights do not fit .*abnormal_gate"):
        train([cohort], tmp_path / "back.pt", _config(steps=4, init_from=str(warm)),
              progress=False)
    assert payload["train_config"]["null_by_slice"] is True
    book = payload["model"]["abnormal_quantizer.codebook"]
    assert torch.equal(book[0], torch.zeros_like(book[0]))  # row 0 became the null code
    source = read_checkpoint(out)["model"]["abnormal_quantizer.codebook"]
    assert not torch.equal(source[0], torch.zeros_like(source[0]))


def test_gate_weight_trains_the_gate_and_needs_one(cohort, tmp_path):
    with pytest.raises(TrainingError, match="needs the gate"):
        train([cohort], tmp_path / "no-gate.pt",
              _config(steps=2, weights=LossWeights(rec=5.0, gate=1.0)), progress=False)
    assert not (tmp_path / "no-gate.pt").exists()
    out = tmp_path / "gate.pt"
    train([cohort], out, _config(steps=4, null_code=True, null_by_slice=True,
                                 abnormal_gate=True, weights=LossWeights(rec=5.0, gate=1.0)),
          progress=False)
    assert _records(out)[-1]["train_loss"]["gate"] > 0
    assert read_checkpoint(out)["train_config"]["weights"]["gate"] == 1.0


def test_gate_by_position_warm_started_from_a_pooled_gate(cohort, tmp_path):
    """The pooled gate of the source is left behind; the rest of its weights carry over."""
    pooled = tmp_path / "pooled.pt"
    train([cohort], pooled, _config(steps=2, null_code=True, null_by_slice=True,
                                    abnormal_gate=True), progress=False)
    with pytest.raises(TrainingError, match="needs the gate"):
        train([cohort], tmp_path / "alone.pt", _config(steps=2, gate_by_position=True),
              progress=False)
    with pytest.raises(TrainingError, match="give it a --gate-weight"):
        train([cohort], tmp_path / "untrained.pt",
              _config(steps=2, abnormal_gate=True, gate_by_position=True), progress=False)
    out = tmp_path / "positions.pt"
    train([cohort], out, _config(steps=2, init_from=str(pooled), null_code=True,
                                 null_by_slice=True, abnormal_gate=True, gate_by_position=True,
                                 weights=LossWeights(rec=5.0, gate=1.0), lr=1e-12),
          progress=False)
    payload = read_checkpoint(out)
    assert payload["config"]["gate_by_position"] is True
    assert payload["train_config"]["gate_by_position"] is True
    assert not any(k.startswith("encoder.abnormal_gate.") for k in payload["model"])
    assert payload["model"]["encoder.position_gate.head.weight"].shape[:2] == (1, 32)
    assert _records(out)[-1]["train_loss"]["gate_positions"] > 0
    source = read_checkpoint(pooled)["model"]["encoder.normal_head.weight"]
    assert torch.allclose(payload["model"]["encoder.normal_head.weight"], source, atol=1e-6)


def test_redraw_replaces_only_slices_with_a_tissue_map_and_keeps_labels():
    from model.data.synth import tissue as T
    from model.train import redraw

    tissue = torch.zeros(6, 64, 64, dtype=torch.uint8)
    tissue[:, 8:56, 8:56] = T.WM
    tissue[:, 20:30, 20:30] = T.ENHANCING
    image = torch.full((6, 1, 64, 64), 0.5)
    batch = {"image": image, "abnormal": torch.zeros(6, 64, 64, dtype=torch.long),
             "tissue": tissue, "has_tissue": torch.tensor([True, True, True, False, False, True])}
    out = redraw(batch, 1.0, seed=3, device=torch.device("cpu"))
    changed = (out["image"] != image).flatten(1).any(1)
    assert changed.tolist() == batch["has_tissue"].tolist()
    assert out["abnormal"] is batch["abnormal"]
    # Drawn from the map: background stays 0, the enhancing square is brighter than white matter.
    for i in torch.nonzero(changed).flatten():
        x = out["image"][i, 0]
        assert (x[tissue[i] == 0] == 0).all()
        assert x[20:30, 20:30].median() > x[40:50, 40:50].median()
    again = redraw(batch, 1.0, seed=3, device=torch.device("cpu"))
    torch.testing.assert_close(out["image"], again["image"])
    assert (redraw(batch, 0.0, seed=3, device=torch.device("cpu"))["image"] == image).all()


def test_redraw_draws_thick_slices_from_the_slab_when_asked():
    from model.data.synth import tissue as T
    from model.data.synth.appearance import SLAB_HALF
    from model.train import redraw

    tissue = torch.zeros(4, 64, 64, dtype=torch.uint8)
    tissue[:, 8:56, 8:56] = T.WM
    slab = tissue[:, None].repeat(1, 2 * SLAB_HALF + 1, 1, 1)
    slab[:, SLAB_HALF + 1, 20:30, 20:30] = T.ENHANCING  # only in the level above
    batch = {"image": torch.full((4, 1, 64, 64), 0.5), "abnormal": torch.zeros(4, 64, 64),
             "tissue": tissue, "tissue_slab": slab, "has_tissue": torch.ones(4, dtype=bool)}
    cpu = torch.device("cpu")
    thin = redraw(batch, 1.0, seed=5, device=cpu)["image"]
    # thick 0: the slab is not read, the draws are those of a batch without one.
    no_slab = {k: v for k, v in batch.items() if k != "tissue_slab"}
    torch.testing.assert_close(thin, redraw(no_slab, 1.0, seed=5, device=cpu)["image"])
    # The same draws with and without the lesion in the level above: the thick slices show it
    # (brighter against the white matter around), the 1 mm ones do not.
    plain = dict(batch, tissue_slab=tissue[:, None].repeat(1, 2 * SLAB_HALF + 1, 1, 1))
    torch.testing.assert_close(thin, redraw(plain, 1.0, seed=5, device=cpu)["image"])

    def contrast(image):
        return (image[:, 0, 20:30, 20:30].flatten(1).median(1).values
                / image[:, 0, 40:50, 40:50].flatten(1).median(1).values)

    with_lesion = contrast(redraw(batch, 1.0, seed=5, device=cpu, thick=1.0)["image"])
    without = contrast(redraw(plain, 1.0, seed=5, device=cpu, thick=1.0)["image"])
    assert (with_lesion > without + 0.02).all()


def test_thick_slices_need_render(cohort, tmp_path):
    from model.train import TrainConfig, TrainingError, train

    with pytest.raises(TrainingError, match="--thick-slices.*--render"):
        train([cohort], tmp_path / "run.pt", TrainConfig(steps=1, thick_slices=0.5))


def test_render_run_logs_the_monitored_cohort(cohort, synth_cohort, tmp_path):
    """A run that redraws from tissue maps, monitoring a cohort it neither trains on nor selects
    by: its figures are logged at every evaluation and the score ignores them."""
    monitored = tmp_path / "monitored"
    shutil.copytree(synth_cohort / "SYN3_0003", monitored / "SYN3_0003")
    out = tmp_path / "render.pt"
    train([cohort], out, _config(steps=4, render=0.5, monitor=[str(monitored)]),
          progress=False)
    records = _records(out)
    for record in records:
        mon = record["held_out"]["monitor"]
        assert mon["slices"] > 0
        for key in ("abn_lesion_at5", "abn_clean_at5", "dice_whole", "rec_ssim_brain"):
            assert mon[key] is None or 0.0 <= mon[key] <= 1.0, key
    payload = read_checkpoint(out)
    assert payload["train_config"]["render"] == 0.5
    assert payload["train_config"]["monitor"] == [str(monitored)]
    assert "SYN3_0003" not in payload["held_out_patients"]
    with pytest.raises(TrainingError, match="none: no such data folder"):
        train([cohort], tmp_path / "x.pt", _config(steps=1, monitor=[str(tmp_path / "none")]),
              progress=False)


def test_redraw_with_a_residue_brightens_the_edge_and_zero_changes_nothing():
    from model.data.synth import tissue as T
    from model.train import redraw

    tissue = torch.zeros(4, 64, 64, dtype=torch.uint8)
    tissue[:, 12:52, 12:52] = T.WM
    batch = {"image": torch.full((4, 1, 64, 64), 0.5), "abnormal": torch.zeros(4, 64, 64),
             "tissue": tissue, "has_tissue": torch.ones(4, dtype=bool)}
    cpu = torch.device("cpu")
    plain = redraw(batch, 1.0, seed=2, device=cpu)["image"]
    torch.testing.assert_close(plain, redraw(batch, 1.0, seed=2, device=cpu, residue=0.0)["image"])
    banded = redraw(batch, 1.0, seed=2, device=cpu, residue=1.0)
    assert banded["abnormal"] is batch["abnormal"]
    outside = (tissue == 0)[:, None]
    assert (plain[outside] == 0).all()
    assert ((banded["image"] > 0) & outside).flatten(1).any(1).all()  # every slice got a band


def test_residue_needs_render(cohort, tmp_path):
    from model.train import TrainConfig, TrainingError, train

    with pytest.raises(TrainingError, match="--residue.*--render"):
        train([cohort], tmp_path / "run.pt", TrainConfig(steps=1, residue=0.5))


def test_weight_average_moves_floats_by_the_decay_and_follows_counters():
    from model.train import WeightAverage

    live = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(live, decay=0.75)
    start = live[0].weight.detach().clone()
    with torch.no_grad():
        live[0].weight.add_(4.0)
    live[1].num_batches_tracked += 3
    average.update(live)
    # a quarter of the way from the start to the live weights; a counter is the live one's
    torch.testing.assert_close(average.model[0].weight, start + 1.0)
    assert int(average.model[1].num_batches_tracked) == 3
    assert not average.model[0].weight.requires_grad
    with pytest.raises(TrainingError, match="--ema must lie in"):
        WeightAverage(live, decay=1.0)


def test_ema_run_evaluates_and_keeps_the_averaged_weights_and_resumes_exactly(cohort, full_run,
                                                                             tmp_path):
    out, _ = full_run
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    result = train([cohort], whole, _config(ema=0.5), progress=False)
    state = read_checkpoint(whole)
    live, averaged = state["model"], state["ema"]
    name = next(k for k, v in live.items() if v.is_floating_point() and v.dim() == 4)
    assert not torch.equal(live[name], averaged[name])
    # The live weights are those of the run without --ema (same steps, same draws) ...
    for key, tensor in read_checkpoint(out)["model"].items():
        assert torch.allclose(live[key].float(), tensor.float(), atol=1e-5), key
    # ... the evaluations read the averaged ones: the record differs from that run's after step 0
    assert _records(whole)[0]["held_out"] == _records(out)[0]["held_out"]
    assert _records(whole)[-1]["held_out"] != _records(out)[-1]["held_out"]
    best = read_checkpoint(result["best_path"])
    assert best["weights"] == "ema" and "ema" not in best
    if best["step"] == 8:
        assert torch.equal(best["model"][name], averaged[name])
    # Stopped after one step and resumed: the average travels in the checkpoint.
    train([cohort], part, _config(ema=0.5), progress=False, minutes=1e-9)
    train([cohort], part, _config(ema=0.5), progress=False, resume=True)
    again = read_checkpoint(part)["ema"]
    for key, tensor in averaged.items():
        assert torch.allclose(again[key].float(), tensor.float(), atol=1e-5), key
