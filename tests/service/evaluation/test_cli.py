"""``cbir eval`` as a user runs it: the report is written and summarised; a bad input exits 2
naming the problem."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def test_cbir_eval_writes_the_report(eval_index, split_cohort, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", "--index", str(eval_index), "--queries",
                                 str(split_cohort[1]), "--out", str(out), "--k", "1,2",
                                 "--max-queries", "4", "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    assert data["k"] == [1, 2] and data["queries"]["slices"] == 4
    assert data["command"].startswith(f"cbir eval --index {eval_index} --queries ")
    assert (out / "index.html").stat().st_size > 10_000
    assert "at k = 2: model | pixels | random | oracle" in result.output
    assert "normal_dice" in result.output
    healthy = data["figures"]["abnormal"]["healthy_precision"]["at_k"]["2"]["model"]["value"]
    assert f"abnormal healthy_precision  {healthy:.3f} |" in result.output
    whole = data["model"]["segmentation_dice_whole"]
    assert f"  segmentation_dice_whole    {whole['value']:.3f} ({whole['slices']})" \
        in result.output
    assert f"headline (abnormal space, top-2): lesion-free precision {healthy:.3f}, " \
        in result.output


def test_cbir_eval_refuses_indexed_query_patients(eval_index, split_cohort, tmp_path):
    result = runner.invoke(app, ["eval", "--index", str(eval_index), "--queries",
                                 str(split_cohort[0]), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "query patients are in the index: SYN3_0000, SYN3_0001" in result.output
    assert not (tmp_path / "r").exists()


def test_cbir_eval_refuses_a_bad_k(eval_index, split_cohort, tmp_path):
    result = runner.invoke(app, ["eval", "--index", str(eval_index), "--queries",
                                 str(split_cohort[1]), "--out", str(tmp_path / "r"),
                                 "--k", "0,5"])
    assert result.exit_code == 2
    assert "at least 1" in result.output
