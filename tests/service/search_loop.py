"""A search client for another process (``multiprocessing`` spawn): kept free of heavy imports
so that the child starts in a moment."""

from __future__ import annotations

import json
from pathlib import Path

import httpx


def search_loop(url: str, query: bytes, out: str, stop: str) -> None:
    """The same search, one at a time, until ``stop`` exists; one JSON line per answer: the
    generation that answered, the status, the nearest distance per patient."""
    with httpx.Client(base_url=url, timeout=600) as client, open(out, "a") as fh:
        while not Path(stop).exists():
            try:
                r = client.post("/search?space=normal&k=10&group=patient",
                                files={"file": ("q.png", query)})
            except httpx.TransportError as exc:
                answer = {"status": type(exc).__name__}
            else:
                answer = {"status": r.status_code,
                          "generation": r.headers.get("X-Index-Generation")}
                if r.status_code == 200:
                    answer["nearest"] = {n["patient_id"]: n["distance"]
                                         for n in r.json()["neighbors"]}
                else:
                    answer["detail"] = r.text[:300]
            fh.write(json.dumps(answer) + "\n")
            fh.flush()
