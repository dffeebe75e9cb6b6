"""``cbir bench service``: /search latency per stage and end to end, and throughput under load.

The real app is served by uvicorn on a loopback port and driven over HTTP by httpx clients, so
the figures include multipart parsing, JSON and the event loop. Queries are 8-bit PNGs of
indexed slices, drawn at random (seeded): what a reader uploading an exported slice sends. Stage
times come from the ``Server-Timing`` header each response carries (decode, encode, search,
catalogue, render); end to end is measured by the client.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from indexer.layout import SPACES
from service.api.app import create_app
from service.config import Settings
from service.retrieval import Retrieval, grey_png

STAGES = ("decode", "encode", "search", "catalogue", "render")


@dataclass
class Samples:
    end_to_end: list[float] = field(default_factory=list)  # seconds
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})

    def add(self, seconds: float, server_timing: str) -> None:
        self.end_to_end.append(seconds)
        for part in server_timing.split(","):
            name, _, dur = part.strip().partition(";dur=")
            if name in self.stages:
                self.stages[name].append(float(dur) / 1000)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _serve(settings: Settings,
           retrieval: Retrieval) -> tuple[str, uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(create_app(settings, retrieval), host="127.0.0.1",
                                           port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, thread


def _queries(retrieval: Retrieval, count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(retrieval.slice_ids, size=min(count, len(retrieval.slice_ids)),
                     replace=False)
    return [grey_png(retrieval.slice_pixels(int(i))[0]) for i in ids]


def _search(client: httpx.Client, space: str, k: int, png: bytes, samples: Samples) -> None:
    start = time.perf_counter()
    r = client.post(f"/search?space={space}&k={k}", files={"file": ("q.png", png, "image/png")})
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"/search answered {r.status_code}: {r.text[:200]}")
    samples.add(elapsed, r.headers.get("server-timing", ""))


def bench_service(index_dir: Path, queries: int = 100, concurrency: int = 8, k: int = 10,
                  seed: int = 0, log: Callable[[str], None] = print) -> dict:
    settings = Settings(index_dir=index_dir, max_upload_mb=32)
    retrieval = Retrieval.open(index_dir)
    counts = retrieval.counts()
    log(f"index: {counts['slices']} slices of {counts['patients']} patients, preset "
        f"{retrieval.build.preset}, model on {retrieval.device}, FAISS "
        f"{'GPU' if retrieval.faiss_gpu else 'CPU'}; {queries} queries per space, k={k}")
    pngs = _queries(retrieval, queries, seed)
    url, server, thread = _serve(settings, retrieval)
    results: dict = {"slices": counts["slices"], "latency": {}, "throughput": {}}
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            for png in pngs[:5]:  # warm-up: first calls allocate
                _search(client, "normal", k, png, Samples())
            for space in SPACES:
                samples = Samples()
                for png in pngs:
                    _search(client, space, k, png, samples)
                results["latency"][space] = samples
        for space in SPACES:
            samples = Samples()
            lock = threading.Lock()
            work = list(pngs)

            def client_loop(space=space, samples=samples, lock=lock, work=work):
                with httpx.Client(base_url=url, timeout=300) as c:
                    while True:
                        with lock:
                            if not work:
                                return
                            png = work.pop()
                        _search(c, space, k, png, samples)

            started = time.perf_counter()
            threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            results["throughput"][space] = (len(samples.end_to_end) / wall, samples)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        retrieval.close()

    log("\nsequential, one client (ms)        p50      p95")
    for space, samples in results["latency"].items():
        for name, values in [*samples.stages.items(), ("end to end", samples.end_to_end)]:
            log(f"  {space:8s} {name:22s} {percentile(values, 50) * 1000:8.2f} "
                f"{percentile(values, 95) * 1000:8.2f}")
    log(f"\n{concurrency} concurrent clients      requests/s   p50 ms   p95 ms")
    for space, (rate, samples) in results["throughput"].items():
        p50, p95 = (percentile(samples.end_to_end, q) * 1000 for q in (50, 95))
        log(f"  {space:8s}                 {rate:9.2f} {p50:8.1f} {p95:8.1f}")
    median_e2e = statistics.median(results["latency"]["normal"].end_to_end)
    log(f"\none client would serve about {1 / median_e2e:.2f} requests/s (1 / median end to end "
        f"in normal space)")
    return results
