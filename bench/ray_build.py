"""Slices/s of ``cbir index build``: one process against Ray with 1 and 2 encoding workers.

    python -m bench.ray_build --data COHORT [--checkpoint CKPT] [--repeats 2]

Every build indexes the same cohort into a fresh directory, in one run, in turn (one, Ray 1,
Ray 2, then again), so the figures are side by side. Two rates per build: end to end (wall time
of ``Indexer.build``, Ray's start included, as a user waits for it) and encode (the report's
``slices_per_s``: slices over the encode stage's seconds). The per-worker encode rate that an
archive is planned with is the Ray 1-worker encode rate. Prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from indexer.build import DEFAULT_CHECKPOINT, Indexer
from indexer.distributed import RayOptions

ARCHIVE_SLICES = 1.5e7


def build_once(data: Path, checkpoint: Path, ray: RayOptions | None) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = Indexer(Path(tmp) / "index").build([data], checkpoint, progress=False, ray=ray)
        wall = time.perf_counter() - t0
    return report.slices_added / wall, report.slices_per_s, report.slices_added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path(DEFAULT_CHECKPOINT))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setups = {"one process": None, "Ray, 1 worker": RayOptions(workers=1),
              "Ray, 2 workers": RayOptions(workers=2)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    slices = 0
    for _ in range(args.repeats):
        for name, ray in setups.items():
            end_to_end, encode, slices = build_once(args.data, args.checkpoint, ray)
            runs[name].append((end_to_end, encode))
    print(f"{slices} slices, median of {args.repeats} builds each")
    for name, rs in runs.items():
        e2e = statistics.median(r[0] for r in rs)
        enc = statistics.median(r[1] for r in rs)
        print(f"{name:15s} end to end {e2e:6.1f} slices/s   encode {enc:6.1f} slices/s")
    per_worker = statistics.median(r[1] for r in runs["Ray, 1 worker"])
    days = ARCHIVE_SLICES / per_worker / 86400
    print(f"per-worker encode rate {per_worker:.1f} slices/s: {ARCHIVE_SLICES:.1e} slices take "
          f"{days:.1f} worker-days ({days * 24 / 100:.1f} h on 100 such workers)")


if __name__ == "__main__":
    main()
