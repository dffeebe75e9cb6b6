"""Prometheus metrics of one app: requests, end-to-end latency, and latency per stage.

A registry per app (not the global one), so that several apps in one process (the tests) keep
separate counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# 1 ms .. 30 s: a flat search is milliseconds, a CPU encode tens to hundreds of ms.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGES = ("decode", "encode", "search", "catalogue", "render")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cbir_requests", "HTTP requests handled.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("cbir_request_seconds", "End-to-end request latency.",
                                 ["route"], buckets=BUCKETS, registry=self.registry)
        self.stage = Histogram("cbir_stage_seconds",
                               "Latency per stage: decode (upload to slice), encode (model), "
                               "search (FAISS), catalogue (rows and distance maps), render "
                               "(PNG encoding).", ["stage"], buckets=BUCKETS,
                               registry=self.registry)
        for stage in STAGES:  # expose every stage from the start, at zero
            self.stage.labels(stage)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage.labels(stage).observe(value)
