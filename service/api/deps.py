"""Dependencies of the routes: the loaded retrieval engine, settings, and the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.retrieval import Retrieval

_bearer = HTTPBearer(auto_error=False, description="CBIR_API_KEY as a bearer token.")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="CBIR_API_KEY.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_retrieval(request: Request, response: Response) -> Retrieval:
    """The generation served when the request starts; the request keeps it to the end, however
    many newer ones are swapped in meanwhile (``service.live``). JSON answers name it in the
    ``X-Index-Generation`` header."""
    retrieval = request.app.state.retrieval
    if retrieval is None:
        raise HTTPException(503, detail=f"the index is not loaded: {request.app.state.load_error}")
    response.headers["X-Index-Generation"] = str(retrieval.build.generation)
    return retrieval


def require_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> None:
    """When CBIR_API_KEY is set, the request must carry it (bearer token or X-API-Key)."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    given = header if header is not None else (bearer.credentials if bearer else None)
    if given is None:
        raise HTTPException(401, detail="missing API key: send 'Authorization: Bearer <key>' or "
                                        "'X-API-Key: <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, detail="wrong API key", headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[Settings, Depends(get_settings)]
RetrievalDep = Annotated[Retrieval, Depends(get_retrieval)]

SliceId = Annotated[int, Path(ge=0, le=2**63 - 1, description="A slice id (its FAISS id).")]
