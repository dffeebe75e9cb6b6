"""cbir bench service: it runs against a real index and prints every figure it promises."""

from __future__ import annotations

from service.bench import STAGES, bench_service


def test_bench_service_prints_latency_per_stage_and_throughput(service_index):
    lines: list[str] = []
    results = bench_service(service_index, queries=3, concurrency=2, k=4, log=lines.append)
    text = "\n".join(lines)
    for space in ("normal", "abnormal", "concat"):
        samples = results["latency"][space]
        assert len(samples.end_to_end) == 3
        for stage in STAGES:
            assert len(samples.stages[stage]) == 3, (space, stage)
            assert f"{space:8s} {stage:22s}" in text
        rate, loaded = results["throughput"][space]
        assert rate > 0 and len(loaded.end_to_end) == 3
    # Stages happen inside the request: their sum cannot exceed the end-to-end time.
    s = results["latency"]["concat"]
    for i in range(3):
        assert sum(s.stages[st][i] for st in STAGES) <= s.end_to_end[i]
