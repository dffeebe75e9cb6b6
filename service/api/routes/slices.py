"""The catalogue: GET /slices/{id}, its image and label overlay; GET /patients, /patients/{id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import RetrievalDep, SliceId
from service.api.schemas import PatientInfo, PatientSlice, PatientSummary, SliceInfo
from service.retrieval import NotFound, Timings, grey_png, overlay_png

router = APIRouter(tags=["catalogue"])

PNG = {200: {"content": {"image/png": {}}, "description": "A 256 x 256 PNG."},
       401: {"description": "Missing or wrong API key"},
       404: {"description": "No such slice"}}
# Index images never change under a slice id (ids are never reused).
CACHE = {"Cache-Control": "private, max-age=86400, immutable"}


def _not_found(exc: NotFound) -> HTTPException:
    return HTTPException(404, detail=str(exc))


@router.get("/slices/{slice_id}", response_model=SliceInfo, summary="A slice's catalogue row",
            responses={404: {"description": "No such slice"}})
async def get_slice(request: Request, retrieval: RetrievalDep, slice_id: SliceId) -> SliceInfo:
    timings = Timings()
    request.state.timings = timings.seconds

    def work() -> SliceInfo:
        with timings.stage("catalogue"):
            try:
                row, patient = retrieval.slice_row(slice_id)
            except NotFound as exc:
                raise _not_found(exc) from None
            codes, _ = retrieval.slice_codes(slice_id)
            labelled = retrieval.has_labels(slice_id)
        return SliceInfo(
            slice_id=row.id, patient_id=patient, slice_index=row.slice_index,
            has_abnormality=row.has_abnormality, area_tc=row.area_tc, area_ed=row.area_ed,
            area_et=row.area_et, brain_area=row.brain_area,
            image_url=f"/slices/{row.id}/image.png",
            overlay_url=f"/slices/{row.id}/overlay.png" if labelled else None,
            normal_codes=codes.normal.tolist(), abnormal_codes=codes.abnormal.tolist())

    return await run_in_threadpool(work)


async def _png(retrieval, slice_id: int, with_labels: bool) -> Response:
    def work() -> bytes:
        try:
            image, labels = retrieval.slice_pixels(slice_id)
        except NotFound as exc:
            raise _not_found(exc) from None
        if not with_labels:
            return grey_png(image)
        if labels is None:
            raise HTTPException(404, detail=f"slice {slice_id}: its patient has no "
                                            f"segmentation, so there is no overlay")
        return overlay_png(image, labels)

    return Response(await run_in_threadpool(work), media_type="image/png", headers=CACHE)


@router.get("/slices/{slice_id}/image.png", response_class=Response, responses=PNG,
            summary="A slice's image")
async def slice_image(retrieval: RetrievalDep, slice_id: SliceId) -> Response:
    return await _png(retrieval, slice_id, with_labels=False)


@router.get("/slices/{slice_id}/overlay.png", response_class=Response, responses=PNG,
            summary="A slice's image with its ground-truth labels (TC red, ED green, ET yellow)")
async def slice_overlay(retrieval: RetrievalDep, slice_id: SliceId) -> Response:
    return await _png(retrieval, slice_id, with_labels=True)


@router.get("/patients", response_model=list[PatientSummary], summary="Every indexed patient",
            responses={401: {"description": "Missing or wrong API key"}})
async def list_patients(retrieval: RetrievalDep) -> list[PatientSummary]:
    """For browsing the archive: each patient's id, slice count and lesion slices, by id."""
    return [PatientSummary(patient_id=ext, slice_count=n, has_labels=labelled,
                           lesion_slices=lesion)
            for ext, n, labelled, lesion in retrieval.patient_list()]


@router.get("/patients/{patient_id}", response_model=PatientInfo, summary="A patient",
            responses={404: {"description": "No such patient"}})
async def get_patient(
    retrieval: RetrievalDep,
    patient_id: Annotated[str, Path(max_length=255, description="External patient id.")],
) -> PatientInfo:
    def work() -> PatientInfo:
        try:
            patient, slices = retrieval.patient(patient_id)
        except NotFound as exc:
            raise _not_found(exc) from None
        return PatientInfo(
            patient_id=patient.external_id, cohort=patient.cohort,
            slice_count=patient.slice_count, added_at=patient.added_at,
            has_labels=any(flag is not None for _, _, flag in slices),
            study_uid=patient.study_uid, series_uid=patient.series_uid,
            slices=[PatientSlice(slice_id=i, slice_index=k, has_abnormality=f)
                    for i, k, f in slices])

    return await run_in_threadpool(work)
