"""The composed query's trade-off: `cbir eval`'s compose figures under other ways of joining the
two halves, on one index and one query cohort.

    python -m bench.compose_weighting INDEX QUERY_DIR 1,0.3,0.1,0.03
    python -m bench.compose_weighting INDEX QUERY_DIR shortlist:20,lesionlist:50,rrf:60
    python -m bench.compose_weighting INDEX QUERY_DIR lesions:1,lesions:0
    python -m bench.compose_weighting INDEX QUERY_DIR overlap:1,overlap:2,overlap:3

A number scales the abnormal half's balanced weight; ``lesions:F`` does the same among the
reference slices with a lesion only (``/compose``'s ``has_abnormality=true`` filter).
``shortlist:M`` keeps the M slices nearest in anatomy (normal half) and ranks them by the
balanced sum; ``lesionlist:M`` keeps the M nearest in lesion (abnormal half) and ranks them by
anatomy; ``rrf:C`` ranks by reciprocal rank fusion, 1 / (C + normal rank) + 1 / (C + abnormal
rank); ``overlap:W`` is /compose's default weighting with ``OVERLAP_WEIGHT`` = W.
Use a query cohort of its own (not the one the README's table reports) when choosing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from service import retrieval as retrieval_module
from service.evaluation.protocol import evaluate
from service.retrieval import Retrieval


def _ranked_compose(rule: str, size: int):
    """A stand-in for ``Retrieval.compose`` ranking by ``rule``; hits carry what eval reads."""
    balanced = Retrieval.compose

    def compose(self, codes, k, timings, weighting="balanced", **filters):
        every = balanced(self, codes, len(self.slice_ids), timings, weighting="balanced",
                         **filters)
        rows = {h.slice_id: h for h in every}
        ids = np.array([h.slice_id for h in every])
        found = self.compose_halves(codes, np.searchsorted(self.slice_ids, ids))
        halves = [found["normal"], found["abnormal"]]
        if rule == "shortlist":  # `every` is in balanced order already
            order = np.sort(np.argsort(halves[0], kind="stable")[:size])
        elif rule == "lesionlist":
            near = np.argsort(halves[1], kind="stable")[:size]
            order = near[np.argsort(halves[0][near], kind="stable")]
        else:
            ranks = [np.argsort(np.argsort(h, kind="stable")) for h in halves]
            order = np.argsort(-(1.0 / (size + ranks[0]) + 1.0 / (size + ranks[1])),
                               kind="stable")
        return [rows[int(ids[i])] for i in order[:k]]

    return compose


def _with_lesion(compose):
    """``compose`` among the reference slices with a lesion only."""
    def restricted(self, codes, k, timings, weighting="balanced", **filters):
        return compose(self, codes, k, timings, weighting, **{**filters, "has_abnormality": True})

    return restricted


def main(index: Path, queries: Path, specs: list[str], k: int = 5,
         max_queries: int = 64) -> None:
    weights, compose = Retrieval.compose_weights, Retrieval.compose
    overlap_weight = retrieval_module.OVERLAP_WEIGHT
    try:
        for spec in specs:
            Retrieval.compose, Retrieval.compose_weights = compose, weights  # each spec alone
            retrieval_module.OVERLAP_WEIGHT = overlap_weight
            rule, _, size = spec.partition(":")
            weighting = "balanced"
            if rule == "overlap":
                retrieval_module.OVERLAP_WEIGHT, weighting = float(size), "overlap"
            elif rule in ("shortlist", "lesionlist", "rrf"):
                Retrieval.compose = _ranked_compose(rule, int(size))
            else:
                lesions_only = rule == "lesions"

                def scaled(self, lesion, factor=float(size if lesions_only else spec)):
                    w_normal, w_abnormal = weights(self, lesion)
                    return w_normal, w_abnormal * factor

                Retrieval.compose = _with_lesion(compose) if lesions_only else compose
                Retrieval.compose_weights = scaled
            ev = evaluate(index, [queries], ks=(k,), max_queries=max_queries, seed=0, draws=50,
                          progress=False, compose_weighting=weighting)
            fig = ev.result["figures"]["compose"]

            def value(name, method, fig=fig):
                return fig[name]["at_k"][str(k)][method]["value"]

            print(f"{spec}: anatomy Dice against A {value('normal_dice_a', 'model'):.3f} "
                  f"(random {value('normal_dice_a', 'random'):.3f}), lesion Dice against B "
                  f"{value('lesion_dice_b', 'model'):.3f} (random "
                  f"{value('lesion_dice_b', 'random'):.3f})", flush=True)
    finally:
        Retrieval.compose, Retrieval.compose_weights = compose, weights
        retrieval_module.OVERLAP_WEIGHT = overlap_weight


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","),
         max_queries=int(sys.argv[4]) if len(sys.argv) == 5 else 64)
