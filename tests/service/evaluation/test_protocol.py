"""A whole evaluation on a tiny cohort with the tiny preset: the report's structure, the bounds
every figure must respect (0 <= method <= oracle), the baselines against brute force, and the
inputs it must refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer.layout import space_vectors
from service.evaluation.cohorts import EvaluationError
from service.evaluation.figures import SPACE_FIGURES
from service.evaluation.protocol import evaluate, pixel_vectors
from service.retrieval import Retrieval
from tests.service.evaluation.conftest import KS, MAX_QUERIES

EPS = 1e-6


def test_every_space_has_its_figures_at_every_k(evaluation):
    figs = evaluation.result["figures"]
    assert set(figs) == set(SPACE_FIGURES)
    for space, names in SPACE_FIGURES.items():
        assert set(figs[space]) == set(names), space
        for name in names:
            fig = figs[space][name]
            if "missing" in fig:
                continue
            assert set(fig["at_k"]) == {str(k) for k in KS}
            methods = {"model", "random", "oracle"} | ({"pixels"} if space != "compose" else set())
            for cells in fig["at_k"].values():
                assert set(cells) == methods, (space, name)
    # The synthetic cohort has anatomy labels, lesions, twins and two query patients: every
    # family of figures must be there, not quietly missing.
    for space, name in [("normal", "normal_dice"), ("normal", "lesion_invariance"),
                        ("abnormal", "lesion_dice"), ("abnormal", "lesion_precision"),
                        ("abnormal", "healthy_precision"), ("concat", "normal_dice"),
                        ("compose", "normal_dice_a"), ("compose", "lesion_dice_b")]:
        assert "at_k" in figs[space][name], (space, name, figs[space][name])


def test_oracle_bounds_every_method_and_every_method_is_non_negative(evaluation):
    checked = 0
    for space, figs in evaluation.result["figures"].items():
        for name, fig in figs.items():
            for k, cells in fig.get("at_k", {}).items():
                oracle = cells["oracle"]["value"]
                assert oracle <= 1 + EPS, (space, name, k)
                for method, cell in cells.items():
                    assert -EPS <= cell["value"] <= oracle + EPS, (space, name, k, method)
                    lo, hi = cell["ci"]
                    assert -EPS <= lo <= hi <= 1 + EPS
                    if cell["of_oracle"] is not None:
                        assert -EPS <= cell["of_oracle"] <= 1 + EPS
                    checked += 1
    assert checked > 100


def test_queries_are_drawn_per_patient_with_lesions_where_they_exist(evaluation, eval_index):
    q = evaluation.result["queries"]
    assert q["slices"] == MAX_QUERIES == len(evaluation.queries.image)
    assert set(q["patients"]) == {"SYN3_0002", "SYN3_0003"}
    for pid, p in q["patients"].items():
        assert p["drawn"] == MAX_QUERIES // 2
        assert p["with_lesion"] == (MAX_QUERIES // 4 if p["with_lesion"] else 0), pid
    assert q["with_lesion"] > 0
    assert not set(evaluation.references.patient) & set(q["patients"])


def test_the_model_neighbours_are_the_nearest_codes(evaluation, eval_index):
    retrieval = Retrieval.open(eval_index)
    try:
        k = KS[-1]
        stored = space_vectors(retrieval.codebooks, retrieval.codes[:, 0].astype(np.int64),
                               retrieval.codes[:, 1].astype(np.int64))
        queries = space_vectors(retrieval.codebooks, evaluation.drawn.normal_idx,
                                evaluation.drawn.abnormal_idx)
        for space in ("normal", "abnormal", "concat"):
            d = ((queries[space][:, None, :] - stored[space][None]) ** 2).sum(-1)  # (Q, N)
            got = np.take_along_axis(d, evaluation.neighbours[space], axis=1)
            # Ties between equal codes may order differently: compare the distances.
            np.testing.assert_allclose(got, np.sort(d, axis=1)[:, :k], rtol=1e-4, atol=1e-3)
    finally:
        retrieval.close()


def test_the_pixel_baseline_is_the_nearest_64x64_slices(evaluation):
    refs = pixel_vectors(evaluation.references.image.astype(np.float32) / 255.0)
    queries = pixel_vectors(evaluation.queries.image)
    d = ((queries[:, None, :] - refs[None]) ** 2).sum(-1)
    got = np.take_along_axis(d, evaluation.neighbours["pixels"], axis=1)
    np.testing.assert_allclose(got, np.sort(d, axis=1)[:, :KS[-1]], rtol=1e-4)


def test_composed_queries_pair_slices_of_two_patients(evaluation):
    q = evaluation.queries
    for a, b in enumerate(evaluation.pairs):
        donors = q.has_lesion & (q.patient != q.patient[a])
        assert (b >= 0) == donors.any()
        if b >= 0:
            assert donors[b]
    paired = int((evaluation.pairs >= 0).sum())
    assert paired > 0
    compose = evaluation.result["figures"]["compose"]
    assert compose["normal_dice_a"]["queries"] == compose["lesion_dice_b"]["queries"] == paired


def test_pseudo_normal_figures_compare_with_the_twin(evaluation):
    model = evaluation.result["model"]
    # The input equals its twin away from the lesion's influence: its MAE outside the lesion is
    # small, inside it is not.
    assert model["input_mae_lesion"]["value"] > 10 * model["input_mae_outside"]["value"]
    for name in ("reconstruction_ssim_brain", "pseudo_normal_ssim_outside"):
        assert -1 <= model[name]["value"] <= 1
    assert model["pseudo_normal_mae_lesion"]["slices"] == evaluation.result["queries"][
        "with_lesion"]


def test_headline_names_figures_at_one_k(evaluation):
    head = evaluation.result["headline"]
    assert head["k"] == 3
    assert {(r["space"], r["figure"]) for r in head["figures"]} >= {
        ("normal", "normal_dice"), ("abnormal", "lesion_dice"), ("abnormal", "lesion_precision"),
        ("abnormal", "healthy_precision"), ("compose", "lesion_dice_b")}
    model = evaluation.result["model"]
    assert set(head["model"]) == {"segmentation_dice_tc", "segmentation_dice_ed",
                                  "segmentation_dice_et", "segmentation_dice_whole",
                                  "reconstruction_ssim_brain"}
    for name, fig in head["model"].items():
        assert fig == {"value": round(model[name]["value"], 4), "slices": model[name]["slices"]}
    # Whole-lesion Dice is defined wherever the query or the prediction has a lesion: at least
    # on every query slice with one.
    assert model["segmentation_dice_whole"]["slices"] >= evaluation.result["queries"][
        "with_lesion"]


def test_report_files(evaluation, report_dir):
    data = json.loads((report_dir / "eval.json").read_text())
    assert data == json.loads(json.dumps(evaluation.result))
    assert data["checkpoint"]["weights_sha256"] and data["queries"]["fingerprint"]
    assert data["references"]["fingerprint"]
    page = (report_dir / "index.html").read_text()
    assert page.count('<img src="data:image/png;base64,') >= 4 + len(evaluation.examples)
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    for space in SPACE_FIGURES:
        assert f"<table data-space={space}>" in page


def test_refuses_query_patients_that_the_index_holds(eval_index, split_cohort):
    with pytest.raises(EvaluationError, match="SYN3_0000.*in the index|in the index"):
        evaluate(eval_index, [split_cohort[0]], ks=[1], max_queries=2, progress=False)


def test_refuses_k_above_the_references(eval_index, split_cohort):
    with pytest.raises(EvaluationError, match="exceeds"):
        evaluate(eval_index, [split_cohort[1]], ks=[1, 10**6], max_queries=2, progress=False)


def test_references_elsewhere_without_anatomy_leave_normal_figures_out(eval_index, split_cohort,
                                                                       tmp_path):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    ev = evaluate(eval_index, [split_cohort[1]], ks=[1], max_queries=2, progress=False,
                  reference_dirs=[empty], draws=10)
    assert "pass --references" in ev.result["figures"]["normal"]["normal_dice"]["missing"]
    assert sorted(ev.result["references"]["patients_without_anatomy"]) == [
        "SYN3_0000", "SYN3_0001"]
    assert "at_k" in ev.result["figures"]["abnormal"]["lesion_dice"]
