"""Live updates: a running server follows the catalogue's active generation without a restart.

Every ``cbir index build/add/remove`` ends by one catalogue commit that makes its new generation
active (``indexer.store``). A background thread asks the catalogue every
CBIR_RELOAD_INTERVAL_S seconds which generation is active (one indexed SELECT); when it is not
the one served, the thread loads it beside the served one (``Retrieval.reopen``: FAISS files,
the catalogue view, the model only when the weights changed) and swaps by one reference
assignment. A request takes that reference once, at its start (``deps.get_retrieval``), so it
finishes on the generation it started on however many swaps happen meanwhile, and the old
generation is freed when its last request ends.

A generation that fails to load (a corrupt or missing file, a checkpoint with other weights) is
refused: one error in the log, the served generation stays, and it is not tried again until the
catalogue's active generation changes once more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.loading import GenerationRefused
from service.retrieval import Retrieval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    generation: int
    reason: str


class Reloader:
    """Follows the active generation for the holder of the served ``Retrieval``.

    ``get`` and ``put`` read and replace the one reference requests take
    (``app.state.retrieval``)."""

    def __init__(self, get: Callable[[], Retrieval | None], put: Callable[[Retrieval], None],
                 interval_s: float):
        self._get = get
        self._put = put
        self.interval_s = interval_s
        self.refused: Refusal | None = None  # the last generation that failed to load
        self.loads = 0  # generations loaded (or tried) since start
        self._poll_failed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One poll: load and swap in the active generation if it is new. True when swapped."""
        served = self._get()
        if served is None:
            return False
        try:
            active = served.active_generation()
        except Exception as exc:  # the catalogue is unreachable: keep serving what is loaded
            if not self._poll_failed:
                log.warning("cannot read the catalogue's active generation (%s); still serving "
                            "generation %d", type(exc).__name__, served.build.generation)
            self._poll_failed = True
            return False
        self._poll_failed = False
        if active is None or active == served.build.generation:
            return False
        if self.refused is not None and self.refused.generation == active:
            return False  # tried once; wait for the next change
        self.loads += 1
        started = time.perf_counter()
        try:
            fresh = served.reopen()
        except GenerationRefused as exc:
            self.refused = Refusal(exc.generation, exc.reason)
            log.error("refused generation %d, still serving generation %d: %s",
                      exc.generation, served.build.generation, exc.reason)
            return False
        except Exception as exc:  # catalogue unreadable, out of memory, ...: keep serving
            self.refused = Refusal(active, f"{type(exc).__name__}: {exc}")
            log.error("could not load generation %d, still serving generation %d: %s: %s",
                      active, served.build.generation, type(exc).__name__, exc)
            return False
        self._put(fresh)
        self.refused = None
        log.info("now serving generation %d (%d slices of %d patients) in place of %d, "
                    "loaded in %.1f s", fresh.build.generation, len(fresh.slice_ids),
                    len(fresh.patients), served.build.generation,
                    time.perf_counter() - started)
        return True

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="cbir-reloader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the thread die: the next poll tries again
                log.exception("live reload check failed")
