"""``/redoc`` without the internet: ReDoc's bundle from ``fastapi-offline``, with the one address
it would fetch at run time (the Redocly logo in its menu footer, from cdn.redoc.ly) replaced by an
inline image, so that an offline browser logs no failed request."""

from __future__ import annotations

import functools
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

BUNDLE = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
LOGO_URL = "https://cdn.redoc.ly/redoc/logo-mini.svg"
# A transparent 1x1 SVG: the footer keeps its text link, without a logo to fetch.
INLINE_LOGO = ("data:image/svg+xml,"
               "%3Csvg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/%3E")
SCRIPT_PATH = "/static/redoc/redoc.standalone.js"


@functools.cache
def bundle() -> bytes:
    """The ReDoc bundle with its logo address made inline (read once)."""
    return BUNDLE.read_bytes().replace(LOGO_URL.encode(), INLINE_LOGO.encode())


def add_redoc(app: FastAPI, path: str = "/redoc") -> None:
    """Serve ReDoc's page at ``path`` and its patched bundle beside the other static files."""

    @app.get(SCRIPT_PATH, include_in_schema=False)
    def redoc_script() -> Response:
        return Response(bundle(), media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get(path, include_in_schema=False)
    def redoc_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}",
                              title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{SCRIPT_PATH}", redoc_favicon_url="data:,",
                              with_google_fonts=False)
