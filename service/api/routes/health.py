"""GET /healthz, /readyz, /metrics and /info."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from indexer.layout import SPACES
from service.api.deps import RetrievalDep, SettingsDep, require_key
from service.api.schemas import Health, IndexInfo, Readiness

public = APIRouter(tags=["operations"])
private = APIRouter(tags=["operations"], dependencies=[Depends(require_key)])


@public.get("/healthz", response_model=Health, summary="Alive")
async def healthz() -> Health:
    """Answers as long as the process serves requests (no model call, no I/O)."""
    return Health(status="ok")


@public.get("/readyz", response_model=Readiness, summary="Ready to search",
            responses={503: {"description": "Not loaded, or index and catalogue disagree"}})
async def readyz(request: Request):
    """Model, indices and catalogue loaded and every index holding exactly the catalogue's ids.

    A server that follows the catalogue (CBIR_RELOAD_INTERVAL_S > 0) stays ready while it loads
    a new generation and when it refuses one (it keeps serving the one it holds: `refused` says
    why); one that does not is not ready once the catalogue's active generation moved on."""
    retrieval = request.app.state.retrieval
    if retrieval is None:
        return JSONResponse({"detail": f"not loaded: {request.app.state.load_error}"}, 503)
    problems = retrieval.consistency_problems()
    active = await run_in_threadpool(retrieval.active_generation)
    reloader = request.app.state.reloader
    following = reloader is not None and reloader.interval_s > 0
    if active != retrieval.build.generation and not following:
        problems.append(f"the index changed on disk (generation {active} is active, this server "
                        f"holds {retrieval.build.generation}): restart to load it")
    if problems:
        return JSONResponse({"detail": "; ".join(problems)}, 503)
    refused = reloader.refused if following else None
    return Readiness(status="ready", generation=retrieval.build.generation,
                     slices=len(retrieval.slice_ids), active_generation=active,
                     refused=f"generation {refused.generation}: {refused.reason}"
                     if refused is not None and refused.generation == active else None)


# HEAD answers like GET (status and headers; the server sends no body), for probes that use it.
for _path, _endpoint in (("/healthz", healthz), ("/readyz", readyz)):
    public.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)


@private.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


@private.get("/model-card", summary="The served checkpoint's model card", response_class=Response,
             responses={200: {"content": {"text/markdown": {}}},
                        404: {"description": "The checkpoint has no model card beside it"}})
async def model_card(retrieval: RetrievalDep) -> Response:
    """What the served weights were trained on, how, and what they do and do not do (the
    Markdown file beside the checkpoint: `checkpoints/cbir-cpu.md` for the shipped one)."""
    if retrieval.model_card is None:
        raise HTTPException(404, "the served checkpoint has no model card beside it")
    return Response(retrieval.model_card, media_type="text/markdown; charset=utf-8")


@private.get("/info", response_model=IndexInfo, summary="What this server holds")
async def info(retrieval: RetrievalDep, settings: SettingsDep) -> IndexInfo:
    counts = retrieval.counts()
    return IndexInfo(
        **counts, generation=retrieval.build.generation, preset=retrieval.build.preset,
        checkpoint_sha256=retrieval.build.checkpoint_sha256, spaces=list(SPACES),
        default_k=min(settings.default_k, settings.max_k), max_k=settings.max_k,
        max_upload_mb=settings.max_upload_mb, auth_required=bool(settings.api_key),
        faiss_gpu=retrieval.faiss_gpu, model_note=retrieval.model_note,
        model_card=retrieval.model_card is not None,
        eval_headline=retrieval.eval_headline,
        typical_distance=None if retrieval.reference is None else
        {space: retrieval.reference.median(space) for space in SPACES},
        example=retrieval.example())
