"""The FastAPI application: ``create_app(settings)``; the index is loaded once, at start-up.

Uploads stay in memory: the body limit (``BodyLimit``) caps a request at CBIR_MAX_UPLOAD_MB and
the multipart parser's spool threshold is raised above that cap, so an upload never rolls over
into a temporary file. Nothing logs request bodies; errors name the problem, not the content.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartParser

from service.api.deps import require_key
from service.api.metrics import Metrics
from service.api.middleware import BodyLimit, RequestMetrics
from service.api.routes import health, search, slices, web
from service.config import Settings
from service.retrieval import Retrieval

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


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes each bad value back ('input'); a misplaced upload would come back
    # whole. Keep where and what.
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s while serving a request", type(exc).__name__)
    return JSONResponse({"detail": "internal error; the server log names its type"}, 500)


def create_app(settings: Settings | None = None, retrieval: Retrieval | None = None) -> FastAPI:
    """The app; ``retrieval`` preloaded (``cbir serve`` loads before binding), else loaded by the
    lifespan from ``settings.index_dir``. Construction itself loads nothing."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = app.state.retrieval is None
        if owned:
            app.state.retrieval = Retrieval.open(
                settings.index_dir, db_url=settings.db_url, checkpoint=settings.checkpoint,
                device=settings.device, inference_workers=settings.inference_workers)
        try:
            yield
        finally:
            if owned and app.state.retrieval is not None:
                app.state.retrieval.close()
                app.state.retrieval = None

    app = FastAPI(title="compositional-cbir", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.retrieval = retrieval
    app.state.load_error = "the server is starting"
    app.state.metrics = Metrics()

    # Keep multipart uploads in memory up to the body limit (Starlette spools above 1 MB).
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size,
                                         settings.max_upload_bytes + 1)

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(health.public)
    app.include_router(health.private)
    keyed = [Depends(require_key)]
    app.include_router(search.router, dependencies=keyed)
    app.include_router(slices.router, dependencies=keyed)
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.WEB_DIR), name="static")
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    return app
