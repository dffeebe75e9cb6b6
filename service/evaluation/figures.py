"""From per-pair scores and each method's neighbours to the figures of the report: value, 95 %
bootstrap interval over query patients, and fraction of the oracle, per k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.evaluation import metrics

# What each search space is judged on (issue 11, "Protocol").
SPACE_FIGURES = {
    "normal": ("normal_dice", "lesion_invariance"),
    "abnormal": ("lesion_dice", "tc_dice", "ed_dice", "et_dice", "lesion_precision",
                 "healthy_precision"),
    "concat": ("normal_dice", "lesion_dice", "tc_dice", "ed_dice", "et_dice",
               "lesion_precision", "healthy_precision"),
    "compose": ("normal_dice_a", "lesion_dice_b"),
}
FIGURE_LABELS = {
    "normal_dice": "normal-label Dice (mean of 6 labels)",
    "lesion_invariance": "lesion invariance (top-k shared with the lesion-free twin's)",
    "lesion_dice": "whole-lesion Dice (queries with a lesion)",
    "tc_dice": "TC Dice (queries with TC)",
    "ed_dice": "ED Dice (queries with ED)",
    "et_dice": "ET Dice (queries with ET)",
    "lesion_precision": "lesion precision (queries with a lesion)",
    "healthy_precision": "lesion-free precision (queries without a lesion)",
    "normal_dice_a": "normal-label Dice against A (anatomy donor)",
    "lesion_dice_b": "whole-lesion Dice against B (lesion donor)",
}
METHODS = {
    "model": "the space's FAISS search on the model's codes (what the service returns)",
    "pixels": "L2 on the preprocessed slices area-averaged to 64x64 (flat FAISS index)",
    "random": "k references drawn uniformly (expected value)",
    "oracle": "the k references with the best score (the best any method can do)",
}


@dataclass
class Scores:
    """One figure's per-pair scores: query rows it covers, and their scores against every
    reference, (len(rows), N)."""

    rows: np.ndarray
    values: np.ndarray


def _summary(per: dict[str, np.ndarray], groups: np.ndarray, rng: np.random.Generator,
             draws: int) -> dict:
    oracle = float(per["oracle"].mean())
    out = {}
    for method, values in per.items():
        value = float(values.mean())
        out[method] = {"value": value,
                       "ci": list(metrics.bootstrap_interval(values, groups, rng, draws)),
                       "of_oracle": value / oracle if oracle > 0 else None}
    return out


def _header(name: str, rows: np.ndarray, groups: np.ndarray) -> dict:
    return {"label": FIGURE_LABELS[name], "queries": int(len(rows)),
            "patients": int(len(np.unique(groups[rows])))}


def score_figure(name: str, scores: Scores, neighbours: dict[str, np.ndarray], ks: list[int],
                 groups: np.ndarray, rng: np.random.Generator, draws: int) -> dict:
    """A figure that is the mean of a per-pair score over k neighbours; ``neighbours`` maps a
    method to (Q, >= max k) reference rows, indexed by query row like ``groups``."""
    at_k = {}
    for k in ks:
        per = {m: metrics.neighbour_mean(scores.values, rows[scores.rows], k)
               for m, rows in neighbours.items()}
        per["random"] = metrics.random_mean(scores.values)
        per["oracle"] = metrics.oracle_mean(scores.values, k)
        at_k[str(k)] = _summary(per, groups[scores.rows], rng, draws)
    return {**_header(name, scores.rows, groups), "at_k": at_k}


def invariance_figure(rows: np.ndarray, query_neighbours: dict[str, np.ndarray],
                      twin_neighbours: dict[str, np.ndarray], references: int, ks: list[int],
                      groups: np.ndarray, rng: np.random.Generator, draws: int) -> dict:
    """Lesion invariance of the query rows ``rows`` (with a lesion and a lesion-free twin):
    twin neighbours are indexed like ``rows``. Random: two independent uniform draws share
    k/N in expectation; the oracle (any ranking that ignores the lesion) shares all."""
    at_k = {}
    for k in ks:
        per = {m: metrics.shared_share(query_neighbours[m][rows], twin_neighbours[m], k)
               for m in query_neighbours}
        per["random"] = np.full(len(rows), k / references)
        per["oracle"] = np.ones(len(rows))
        at_k[str(k)] = _summary(per, groups[rows], rng, draws)
    return {**_header("lesion_invariance", rows, groups), "at_k": at_k}


def missing(name: str, why: str) -> dict:
    return {"label": FIGURE_LABELS[name], "missing": why}


def precision_curve(scores: Scores, neighbours: dict[str, np.ndarray], k_max: int) -> dict:
    """Mean precision at every k = 1..k_max per method (no intervals: a plot)."""
    ks = range(1, k_max + 1)
    curve = {m: [float(metrics.neighbour_mean(scores.values, rows[scores.rows], k).mean())
                 for k in ks] for m, rows in neighbours.items()}
    curve["random"] = [float(metrics.random_mean(scores.values).mean())] * k_max
    curve["oracle"] = [float(metrics.oracle_mean(scores.values, k).mean()) for k in ks]
    return curve


def slice_figures(per_slice: dict[str, list[float | None]], groups: np.ndarray,
                  rng: np.random.Generator, draws: int) -> dict:
    """Means over query slices of per-slice model figures (None: not defined for that slice)."""
    out = {}
    for name, values in per_slice.items():
        keep = np.array([v is not None for v in values], bool)
        if not keep.any():
            out[name] = {"value": None, "ci": None, "slices": 0}
            continue
        v = np.array([x for x in values if x is not None], np.float64)
        out[name] = {"value": float(v.mean()),
                     "ci": list(metrics.bootstrap_interval(v, groups[keep], rng, draws)),
                     "slices": int(keep.sum())}
    return out
