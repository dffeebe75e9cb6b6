"""The campaign's load (``bench/campaign.py``): each Locust user uploads PNG slices exported from
the indexed cohort to POST /search, one at a time, in a random space.

A search is one logical request: a connection refused or reset, a timeout or a 5xx (the server
being killed and restarted under it) is an error seen, and the user sends the same search again
until RETRY_S has passed. Locust records the logical request under ``/search`` with its whole
time, failed only when no answer came within RETRY_S (a request lost), and each failed attempt
under ``/search attempt`` (the errors seen). Settings come from the environment:
CAMPAIGN_QUERIES (folder of PNGs), CAMPAIGN_K, CAMPAIGN_RETRY_S.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import requests
from locust import User, constant, task

QUERIES = sorted(Path(os.environ.get("CAMPAIGN_QUERIES", "queries")).glob("*.png"))
K = int(os.environ.get("CAMPAIGN_K", "10"))
RETRY_S = float(os.environ.get("CAMPAIGN_RETRY_S", "60"))
SPACES = ("normal", "abnormal", "concat")


class Lost(Exception):
    """No answer within CAMPAIGN_RETRY_S."""


class Searcher(User):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()
        self.rng = random.Random()
        self.payloads = {p.name: p.read_bytes() for p in QUERIES}

    def on_stop(self) -> None:
        self.session.close()

    def _fire(self, name: str, started: float, length: int, exception: Exception | None):
        self.environment.events.request.fire(
            request_type="POST", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})

    @task
    def search(self) -> None:
        name = self.rng.choice(sorted(self.payloads))
        space = self.rng.choice(SPACES)
        started = time.perf_counter()
        last = "no attempt"
        while time.perf_counter() - started < RETRY_S:
            attempt = time.perf_counter()
            try:
                # group=slice: K neighbours whenever K slices exist (one per patient may be fewer)
                r = self.session.post(f"{self.host}/search",
                                      params={"space": space, "k": K, "group": "slice"},
                                      files={"file": (name, self.payloads[name], "image/png")},
                                      timeout=RETRY_S)
            except requests.RequestException as exc:
                last = type(exc).__name__
                self._fire("/search attempt", attempt, 0, exc)
                time.sleep(0.2)
                continue
            if r.status_code == 200 and len(r.json()["neighbors"]) == K:
                self._fire("/search", started, len(r.content), None)
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            self._fire("/search attempt", attempt, len(r.content), RuntimeError(last))
            if r.status_code < 500:  # the server answered and refused: a bug, not a fault
                break
            time.sleep(0.2)
        self._fire("/search", started, 0, Lost(last))
