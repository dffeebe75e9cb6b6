"""The `cbir` command: clear errors, exit codes, and the data check report."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "synth" in result.output and "data" in result.output


def test_synth_refuses_bad_counts(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "c"), "--patients", "0"])
    assert result.exit_code == 2
    assert "--patients must be at least 1" in result.output
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "c"), "--workers", "0"])
    assert result.exit_code == 2
    assert "--workers must be at least 1" in result.output


def test_synth_writes_and_reports(tmp_path):
    out = tmp_path / "c"
    preview = tmp_path / "p.png"
    result = runner.invoke(app, ["synth", "--out", str(out), "--patients", "1", "--seed", "3",
                                 "--preview", str(preview)])
    assert result.exit_code == 0, result.output
    assert "wrote 1 patients" in result.output and "patients/s" in result.output
    assert "patients without lesion" in result.output
    assert (out / "SYN3_0000").is_dir() and preview.stat().st_size > 10_000


def test_synth_preview_compares_with_a_real_cohort(synth_cohort, tmp_path):
    from PIL import Image

    from model.data.synth.preview import LEVELS

    real = tmp_path / "real"
    one = sorted(p for p in synth_cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(one, real / one.name)  # stands in for a real cohort: any BraTS layout
    preview = tmp_path / "cmp.png"
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "c"), "--patients", "1",
                                 "--seed", "3", "--preview", str(preview),
                                 "--compare", str(real)])
    assert result.exit_code == 0, result.output
    img = Image.open(preview)
    # One synthetic row and one real row of 256-pixel tiles, one column per level.
    assert img.width >= len(LEVELS) * 256 and 2 * 256 <= img.height < 3 * 256

    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "c"), "--patients", "1",
                                 "--compare", str(real)])
    assert result.exit_code == 2 and "give --preview" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "c"), "--patients", "1",
                                 "--preview", str(preview), "--compare", str(empty)])
    assert result.exit_code == 2 and "no usable case under" in result.output


def test_data_check_reports_good_and_bad_patients(synth_cohort, tmp_path):
    result = runner.invoke(app, ["data", "check", str(synth_cohort)])
    assert result.exit_code == 0, result.output
    assert "4 patients readable" in result.output

    root = tmp_path / "mixed"
    good = sorted(p for p in synth_cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(good, root / good.name)
    bad = root / "BraTS20_Training_001"
    bad.mkdir()
    raw = gzip.compress(b"\0" * 4096)
    (bad / "BraTS20_Training_001_t1ce.nii.gz").write_bytes(raw[: len(raw) // 2])
    (root / "BraTS20_Training_002").mkdir()
    (root / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz").write_bytes(b"")
    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 1
    assert "1 patients readable" in result.output
    assert "BraTS20_Training_001_t1ce.nii.gz" in result.output
    assert "missing BraTS20_Training_002_t1ce.nii.gz" in result.output


def test_data_check_names_a_missing_folder(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no such data folder" in result.output


def test_train_names_bad_input(synth_cohort, tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "empty"),
                                 "--out", str(tmp_path / "m.pt"), "--preset", "tiny"])
    assert result.exit_code == 2
    assert "no usable case under" in result.output and "looked for" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--out",
                                 str(tmp_path / "m.pt"), "--preset", "huge"])
    assert result.exit_code == 2 and "unknown preset 'huge'" in result.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    result = runner.invoke(app, ["train", "--data", str(synth_cohort), "--out", str(bad),
                                 "--preset", "tiny", "--resume"])
    assert result.exit_code == 2
    assert "cannot resume" in result.output and "bad.pt: not a readable checkpoint" in result.output


def test_train_resume_takes_the_recorded_recipe_and_refuses_another(synth_cohort, tmp_path):
    out = tmp_path / "run.pt"
    common = ["train", "--data", str(synth_cohort), "--out", str(out)]
    result = runner.invoke(app, [*common, "--preset", "tiny", "--steps", "2", "--batch-size",
                                 "2", "--eval-every", "1", "--eval-slices", "8",
                                 "--val-fraction", "0.5", "--lr", "2e-3", "--minutes", "0.0001"])
    assert result.exit_code == 0, result.output
    assert "stopped (continue with --resume)" in result.output
    result = runner.invoke(app, [*common, "--resume"])  # the recipe comes from the checkpoint
    assert result.exit_code == 0, result.output
    assert "at step 2 of 2, finished" in result.output
    result = runner.invoke(app, [*common, "--resume", "--lr", "1e-3"])
    assert result.exit_code == 2
    assert "other settings (lr 0.002 -> 0.001)" in result.output
    result = runner.invoke(app, [*common, "--preset", "tiny", "--minutes", "0"])
    assert result.exit_code == 2 and "--minutes must be positive" in result.output


def test_train_resume_names_changed_data_and_accepts_it_when_asked(synth_cohort, tmp_path):
    """A cohort written again (the same cases, other bytes: re-synthesized on another machine)
    is refused with what differs, and taken with --accept-new-data; a missing patient is named."""
    data = tmp_path / "cohort"
    shutil.copytree(synth_cohort, data)
    out = tmp_path / "run.pt"
    common = ["train", "--data", str(data), "--out", str(out)]
    result = runner.invoke(app, [*common, "--preset", "tiny", "--steps", "3", "--batch-size",
                                 "2", "--eval-every", "1", "--eval-slices", "4",
                                 "--val-fraction", "0.5", "--minutes", "0.0001"])
    assert result.exit_code == 0, result.output
    image = sorted(data.glob("*/*_t1ce.nii.gz"))[0]
    volume = nib.load(image)
    nib.save(nib.Nifti1Image(volume.get_fdata(dtype=np.float32) * np.float32(1.0001),
                             volume.affine, volume.header), image)
    patients = len([d for d in data.iterdir() if d.is_dir()])
    result = runner.invoke(app, [*common, "--resume"])
    assert result.exit_code == 2
    assert (f"the same {patients} patients, but their image or label files differ in bytes"
            in result.output and "--accept-new-data" in result.output)
    result = runner.invoke(app, [*common, "--accept-new-data"])
    assert result.exit_code == 2 and "applies to --resume only" in result.output
    result = runner.invoke(app, [*common, "--resume", "--accept-new-data", "--minutes", "0.0001"])
    assert result.exit_code == 0, result.output
    assert "accepted by --accept-new-data" in result.output
    assert "at step 2 of 3" in result.output or "at step 3 of 3" in result.output
    shutil.rmtree(image.parent)
    result = runner.invoke(app, [*common, "--resume"])
    assert result.exit_code == 2
    assert f"1 recorded ones missing (e.g. {image.parent.name})" in result.output


def test_train_from_config_takes_another_checkpoints_recipe(synth_cohort, tmp_path):
    """The shipped checkpoint records its recipe: --from-config starts a new run from it, flags
    given override it, and the new run records what it ran."""
    from indexer.build import DEFAULT_CHECKPOINT
    from model.checkpoint import read_checkpoint

    first = tmp_path / "first.pt"
    result = runner.invoke(app, ["train", "--data", str(synth_cohort), "--out", str(first),
                                 "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                                 "--eval-every", "1", "--eval-slices", "8", "--val-fraction",
                                 "0.5", "--null-code", "--null-by-slice", "--abnormal-gate",
                                 "--pi", "500", "--lr", "2e-3"])
    assert result.exit_code == 0, result.output
    second = tmp_path / "second.pt"
    result = runner.invoke(app, ["train", "--data", str(synth_cohort), "--out", str(second),
                                 "--from-config", str(first), "--lr", "1e-3",
                                 "--eval-slices", "0"])
    assert result.exit_code == 0, result.output
    recipe = read_checkpoint(second)["train_config"]
    # --eval-slices 0 evaluates on every held-out slice, over the 8 the first run recorded
    assert recipe["eval_slices"] == 0
    held_out = int(re.search(r"(\d+) held out", result.output).group(1))
    records = [json.loads(line) for line in
               second.with_name(second.name + ".metrics.jsonl").read_text().splitlines()]
    assert records[-1]["held_out"]["slices"] == held_out > 8
    assert recipe["null_code"] and recipe["null_by_slice"] and recipe["abnormal_gate"]
    assert recipe["weights"]["pi"] == 500 and recipe["preset"] == "tiny"
    assert recipe["lr"] == 1e-3 and recipe["batch_size"] == 2
    assert recipe["init_from"] == str(first)  # the warm start is that checkpoint's own weights
    shipped = read_checkpoint(DEFAULT_CHECKPOINT)["train_config"]
    assert shipped["null_code"] and shipped["abnormal_gate"]  # the shipped recipe is there
    result = runner.invoke(app, ["train", "--data", str(synth_cohort), "--out", str(second),
                                 "--from-config", str(first), "--resume"])
    assert result.exit_code == 2 and "give one of them" in result.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    result = runner.invoke(app, ["train", "--data", str(synth_cohort), "--out", str(second),
                                 "--from-config", str(junk)])
    assert result.exit_code == 2 and "--from-config" in result.output


def test_bench_train_prints_every_switch_against_the_plain_step():
    result = runner.invoke(app, ["bench", "train", "--preset", "tiny", "--batch", "2",
                                 "--repeats", "1"])
    assert result.exit_code == 0, result.output
    for variant in ("plain", "+ bf16", "+ null_shortcut", "+ separable_ssim",
                    "+ channels_last", "all four"):
        assert variant in result.output
    assert "1.00x" in result.output and "slices/s" in result.output


def test_bench_model_prints_both_throughputs():
    result = runner.invoke(app, ["bench", "model", "--preset", "tiny", "--batch", "2",
                                 "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "encode" in result.output and "bare stack" in result.output
    assert "ratio" in result.output


def test_soup_names_bad_input(tmp_path):
    result = runner.invoke(app, ["soup", str(tmp_path / "missing.pt"), str(tmp_path / "m2.pt"),
                                 "--out", str(tmp_path / "soup.pt")])
    assert result.exit_code == 2 and "missing.pt: checkpoint file not found" in result.output
    assert not (tmp_path / "soup.pt").exists()
