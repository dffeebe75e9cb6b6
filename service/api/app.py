"""The FastAPI application: ``create_app(settings)``; the index is loaded at start-up and
reloaded when the catalogue's active generation changes (``service.live``).

Uploads stay in memory: the body limit (``BodyLimit``) caps a request at CBIR_MAX_UPLOAD_MB and
the multipart parser's spool threshold is raised above that cap, so an upload never rolls over
into a temporary file; decoding them shares one memory budget (CBIR_DECODE_MEMORY_MB). Nothing
logs request bodies or URLs (the access log names route templates, ``access_log.py``); errors
name the problem, not the content. The API docs (``/docs``, ``/redoc``) load Swagger UI and ReDoc
from the installed ``fastapi-offline`` package, so they work on a network without internet
(ReDoc's one run-time address made inline: ``redoc.py``).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from service.api import access_log
from service.api.deps import require_key
from service.api.metrics import Metrics
from service.api.middleware import BodyLimit, RequestMetrics
from service.api.redoc import add_redoc
from service.api.routes import health, search, slices, web
from service.config import Settings
from service.live import Reloader
from service.retrieval import Retrieval
from service.uploads import DecodeBudget, sanity

log = logging.getLogger(__name__)

DESCRIPTION = """\
Content-based retrieval of brain MRI slices by their **normal** (anatomy) and **abnormal**
(lesion) codes, after Kobayashi et al., *Decomposing Normal and Abnormal Features of Medical
Images for Content-based Image Retrieval* (MIDL 2021).

- `normal`: the same anatomy, with or without a lesion; `abnormal`: a similar lesion in any
  anatomy; `concat`: both.
- `POST /compose` joins one image's anatomy with another's lesion.
- Uploads are decoded in memory and never stored or logged.

When the server has `CBIR_API_KEY` set, send it as `Authorization: Bearer <key>` or
`X-API-Key: <key>` (everything but `/healthz`, `/readyz`, this page and the web page).
"""


MULTIPART_HINT = ("send the upload as multipart/form-data, one file per field ('file'; "
                  "'normal' and 'abnormal' for /compose), e.g. curl -F file=@slice.png")


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if (request.method == "POST" and not _is_multipart(request)
            and any(e.get("loc", ())[:1] == ("body",) for e in errors)):
        kind = request.headers.get("content-type") or "no Content-Type"
        return JSONResponse({"detail": f"the body is not multipart form data ({kind}): "
                                       f"{MULTIPART_HINT}"}, 400)
    # FastAPI's default echoes each bad value back ('input'); a misplaced upload would come back
    # whole. Keep where and what.
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


async def _http_error(request: Request, exc: HTTPException):
    if isinstance(exc.__context__, MultiPartException):  # Starlette's form parser gave up
        return JSONResponse({"detail": f"the body is not valid multipart form data "
                                       f"({exc.detail.rstrip('.')}): {MULTIPART_HINT}"}, 400)
    return await http_exception_handler(request, exc)


def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s while serving a request", type(exc).__name__)
    return JSONResponse({"detail": "internal error; the server log names its type"}, 500)


def create_app(settings: Settings | None = None, retrieval: Retrieval | None = None) -> FastAPI:
    """The app; ``retrieval`` preloaded (``cbir serve`` loads before binding), else loaded by the
    lifespan from ``settings.index_dir``. Construction itself loads nothing."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        access_log.install()
        owned = app.state.retrieval is None
        if owned:
            app.state.retrieval = Retrieval.open(
                settings.index_dir, db_url=settings.db_url, checkpoint=settings.checkpoint,
                device=settings.device, inference_workers=settings.inference_workers)
        sanity.atlas_outlines()  # about 2 s, here rather than in the first search
        reloader = app.state.reloader = Reloader(
            get=lambda: app.state.retrieval,
            put=lambda fresh: setattr(app.state, "retrieval", fresh),
            interval_s=settings.reload_interval_s)
        reloader.start()
        try:
            yield
        finally:
            reloader.stop()
            if owned and app.state.retrieval is not None:
                app.state.retrieval.close()
                app.state.retrieval = None

    app = FastAPIOffline(title="compositional-cbir", version="0.1.0", description=DESCRIPTION,
                         lifespan=lifespan, static_url="/static/docs", redoc_url=None,
                         favicon_url="data:,", swagger_ui_parameters={"validatorUrl": None})
    add_redoc(app)
    app.state.settings = settings
    app.state.retrieval = retrieval  # replaced whole when a new generation is loaded
    app.state.reloader = None
    app.state.load_error = "the server is starting"
    app.state.metrics = Metrics()
    app.state.decode_budget = DecodeBudget(settings.decode_memory_bytes)

    # Keep multipart uploads in memory up to the body limit (Starlette spools above 1 MB).
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size,
                                         settings.max_upload_bytes + 1)

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    routers = (health.public, health.private, search.router, slices.router, web.router)
    keyed = [Depends(require_key)]
    for router in routers:
        private = router in (search.router, slices.router)  # health.private has its own
        app.include_router(router, dependencies=keyed if private else None)
    app.mount("/static", StaticFiles(directory=web.WEB_DIR), name="static")
    # Every route flat, for labelling requests the router never saw (routers have no prefix).
    flat = [*(r for router in routers for r in router.routes),
            *(r for r in app.router.routes if hasattr(r, "path"))]
    # The last added runs first: RequestMetrics sees, counts and logs what BodyLimit refuses.
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics, routes=flat)
    return app
