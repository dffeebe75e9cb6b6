"""One access-log line per request, by route template: ``POST /search 200 183ms``.

Uvicorn's own access log writes the raw URL, and ours carry patient identifiers in paths and
query strings (``/patients/<id>``, ``exclude_patient=<id>``). So the app drops uvicorn's access
records and writes its own from ``RequestMetrics``, which knows the matched route's template
(``GET /patients/{patient_id} 200 3ms``). Nothing of the URL but its template is logged.
"""

from __future__ import annotations

import logging

log = logging.getLogger("service.api.access")


class _DropUvicornAccess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_DROP = _DropUvicornAccess()


def install() -> None:
    """Silence uvicorn's raw-URL access log; make sure ours reaches a handler at INFO."""
    logging.getLogger("uvicorn.access").addFilter(_DROP)  # adding the same filter twice is a no-op
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)


def line(method: str, template: str, status: int, seconds: float) -> None:
    log.info("%s %s %d %.0fms", method, template, status, seconds * 1000)
