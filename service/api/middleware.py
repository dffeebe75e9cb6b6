"""ASGI middleware: request body limit, and per-request metrics, access log and Server-Timing."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import access_log
from service.api.metrics import Metrics


class _BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so a route parsing the body answers 413."""


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or while streaming.

    With the body capped, the multipart parser keeps uploads in memory (see ``app.py``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self) -> str:
        return (f"request body is larger than the limit of {self.max_bytes / 2**20:g} MB "
                f"(CBIR_MAX_UPLOAD_MB)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, self._detail())
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(413, self._detail())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, self._detail())


def route_template(scope: Scope, routes: Sequence[BaseRoute], original: Scope) -> str:
    """The template of the route a request matches (``/patients/{patient_id}``), whether or not
    the router ran: a request refused before routing (413) or served by a plain Starlette route
    (``/openapi.json``, the ``/static`` mounts) is labelled by it too. ``routes``: every route
    and mount of the app, flat; ``original``: the scope as it came in (a mount rewrites it)."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    for candidate in routes:
        match, _ = candidate.matches(original)
        if match != Match.NONE:
            return getattr(candidate, "path", None) or "unmatched"
    return "unmatched"


class RequestMetrics:
    """Count, time and log every request under its route template; add a Server-Timing header.

    Routes put their per-stage seconds in ``scope['state']['timings']``; they go to the stage
    histograms and to ``Server-Timing`` (milliseconds), which the benchmark reads. It is the
    outermost middleware, so requests other middleware refuses (413) are counted too.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        scope.setdefault("state", {})
        original = dict(scope)

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                timings = scope["state"].get("timings")
                if timings:
                    value = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timings.items())
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"],
                                          (b"server-timing", value.encode())]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            seconds = time.perf_counter() - start
            label = route_template(scope, self.routes, original)
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            self.metrics.latency.labels(label).observe(seconds)
            timings = scope["state"].get("timings")
            if timings:
                self.metrics.observe_stages(timings)
            access_log.line(scope["method"], label, status, seconds)
