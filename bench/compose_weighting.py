"""The composed query's trade-off: `cbir eval`'s compose figures with the abnormal half's
balanced weight scaled by each factor given, on one index and one query cohort.

    python -m bench.compose_weighting INDEX QUERY_DIR 1,0.3,0.1,0.03

Use a query cohort of its own (not the one the README's table reports) when choosing a weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

from service.evaluation.protocol import evaluate
from service.retrieval import Retrieval


def main(index: Path, queries: Path, factors: list[float], k: int = 5) -> None:
    balanced = Retrieval.compose_weights
    try:
        for factor in factors:
            def scaled(self, lesion, factor=factor):
                w_normal, w_abnormal = balanced(self, lesion)
                return w_normal, w_abnormal * factor

            Retrieval.compose_weights = scaled
            ev = evaluate(index, [queries], ks=(k,), max_queries=64, seed=0, draws=50,
                          progress=False)
            fig = ev.result["figures"]["compose"]

            def value(name, method, fig=fig):
                return fig[name]["at_k"][str(k)][method]["value"]

            print(f"abnormal weight x {factor:g}: anatomy Dice against A "
                  f"{value('normal_dice_a', 'model'):.3f} (random "
                  f"{value('normal_dice_a', 'random'):.3f}), lesion Dice against B "
                  f"{value('lesion_dice_b', 'model'):.3f} (random "
                  f"{value('lesion_dice_b', 'random'):.3f})", flush=True)
    finally:
        Retrieval.compose_weights = balanced


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), [float(f) for f in sys.argv[3].split(",")])
