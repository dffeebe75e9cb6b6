"""POST /search, /compose and /slices/{id}/similar: nearest slices in a code space."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from service.api.deps import RetrievalDep, SettingsDep, SliceId
from service.api.schemas import (
    ComposeResponse,
    Neighbor,
    QueryInfo,
    SearchResponse,
    SimilarResponse,
    Space,
)
from service.config import MAX_K_LIMIT, Settings
from service.retrieval import (
    BRATS_CLASSES,
    Codes,
    Hit,
    NotFound,
    Retrieval,
    Timings,
    grey_png,
    overlay_png,
)
from service.uploads import (
    DecoderBusy,
    EmptyUpload,
    Limits,
    QuerySlice,
    UnsupportedUpload,
    UploadError,
    UploadTooLarge,
    decode_query,
    sanity,
)

router = APIRouter(tags=["search"])

SPACE_HELP = ("normal: same anatomy, lesion or not; abnormal: similar lesion in any anatomy; "
              "concat: both")
UPLOAD_HELP = ("PNG or JPEG slice (8/16-bit, grey or RGB), NIfTI volume (.nii, .nii.gz), a "
               "single DICOM file, or a .zip of one DICOM series (the post-contrast T1 picked "
               "when it holds several; on the model's 240x240x155 1 mm grid); the kind is read "
               "from the content")

SpaceQ = Annotated[Space, Query(description=SPACE_HELP, openapi_examples={
    "anatomy": {"summary": "same anatomy, lesion or not", "value": "normal"},
    "lesion": {"summary": "similar lesion, any anatomy", "value": "abnormal"},
    "both": {"summary": "anatomy and lesion", "value": "concat"}})]
KQ = Annotated[int, Query(ge=1, le=MAX_K_LIMIT,
                          description="Neighbours to return, 1..CBIR_MAX_K (a setting, 100 unless "
                                      "changed).")]
SliceQ = Annotated[int | None, Query(ge=0, description="Axial slice of a NIfTI volume (or frame "
                                                       "of a multi-frame DICOM); default: the "
                                                       "middle one.")]
SeriesQ = Annotated[str | None, Query(
    max_length=64, description="SeriesInstanceUID of the series to read from a .zip holding "
                               "several; default: the post-contrast T1 by the README's rule "
                               "(DICOM and PACS).")]
ExcludeQ = Annotated[str | None, Query(
    max_length=255, description="Leave out this patient's slices (external id).",
    openapi_examples={"a BraTS patient": {"value": "BraTS20_Training_001"}})]
AbnormalQ = Annotated[bool | None, Query(description="Only slices whose labels hold a lesion "
                                                     "(true) or hold none (false).")]
GroupQ = Annotated[Literal["slice", "patient"], Query(
    description="patient (default, as on the web page): the nearest slice of each of the k "
                "nearest patients (k distinct patients whenever k pass the filters); slice: "
                "the k nearest slices, often neighbouring slices of one patient.")]

WeightingQ = Annotated[Literal["overlap", "balanced", "plain"], Query(
    description="overlap (default): the anatomy half's squared distance over its typical "
                "best-match distance, plus 2 x (1 - the soft Dice between the lesion the model "
                "reads from each slice's abnormal code and the lesion donor's): this anatomy, "
                "with a lesion where the donor has one; balanced: each half's squared distance "
                "over its typical best-match distance, summed (the lesion donor's own "
                "neighbours tend to come back); plain: the paper's L2 in the concat space, "
                "where a lesion code's larger norm decides.")]

PreprocessQ = Annotated[bool, Query(
    description="A NIfTI volume not already in the model's space (240 x 240 x 155 at 1 mm, "
                "skull-stripped) is skull-stripped and registered to it first, as `cbir "
                "preprocess` does (about 10 s); false: use the volume as it is.")]
StrictQ = Annotated[bool, Query(
    description="false (default): an image that does not look like an axial, skull-stripped "
                "brain MRI slice in the model's space (other anatomy, an X-ray or photograph, a "
                "coronal or sagittal cut, noise, a head with skull) is searched and the answer "
                "says what is wrong in `warnings`; true: it is refused with 422 and `detail` "
                "says what is wrong.")]

_UPLOAD_STATUS = ((EmptyUpload, 400), (UnsupportedUpload, 415), (UploadTooLarge, 413))


def _upload_error(exc: UploadError, field: str) -> HTTPException:
    status = next((s for cls, s in _UPLOAD_STATUS if isinstance(exc, cls)), 422)
    return HTTPException(status, detail=f"{field}: {exc}")


def _check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise HTTPException(422, detail=f"k={k} is more than this server's maximum of "
                                        f"{settings.max_k} (CBIR_MAX_K)")


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _neighbors(hits: list[Hit]) -> list[Neighbor]:
    return [Neighbor(rank=h.rank, slice_id=h.slice_id, patient_id=h.patient_id,
                     slice_index=h.slice_index, distance=h.distance,
                     match_percentile=h.match_percentile,
                     has_abnormality=h.has_abnormality,
                     image_url=f"/slices/{h.slice_id}/image.png",
                     overlay_url=f"/slices/{h.slice_id}/overlay.png" if h.has_labels else None,
                     position_distances=h.position_distances.astype(float).round(6).tolist(),
                     study_uid=h.study_uid, series_uid=h.series_uid)
            for h in hits]


def _known_patient(retrieval: Retrieval, external_id: str | None) -> None:
    """Checked before any upload is read or the model runs."""
    if external_id is not None:
        try:
            retrieval.patient_id(external_id)
        except NotFound as exc:
            raise HTTPException(404, detail=f"exclude_patient: {exc}") from None


async def _one_file(request: Request, *fields: str) -> None:
    """FastAPI keeps the last of repeated parts silently; a second file in a field is refused."""
    form = await request.form()
    for field in fields:
        files = [v for v in form.getlist(field) if isinstance(v, StarletteUpload)]
        if len(files) > 1:
            raise HTTPException(422, detail=f"{field}: {len(files)} files were sent in this "
                                            f"field; send exactly one")


async def _read(upload: UploadFile) -> bytes:
    try:
        return await upload.read()
    finally:
        await upload.close()


def _decode(request: Request, data: bytes, slice_index: int | None, settings: Settings,
            timings: Timings, field: str, strict: bool, series: str | None = None,
            preprocess: bool = True) -> tuple[QuerySlice, str | None]:
    """The query slice and, before the model sees it, the image rules' warning (``sanity``):
    refused with 422 instead when ``strict``."""
    limits = Limits(max_image_pixels=settings.max_image_pixels,
                    max_volume_voxels=settings.max_volume_voxels,
                    max_zip_members=settings.max_zip_members,
                    max_zip_bytes=settings.max_zip_bytes)
    with timings.stage("decode"):
        try:
            query = decode_query(data, slice_index, limits, request.app.state.decode_budget,
                                 series, preprocess=preprocess)
        except UploadError as exc:
            raise _upload_error(exc, field) from None
        except DecoderBusy as exc:
            raise HTTPException(503, detail=f"{field}: {exc}; try again shortly",
                                headers={"Retry-After": "5"}) from None
        warning = sanity.warning(query.image)
    if warning and strict:
        raise HTTPException(422, detail=f"{field}: {warning} Refused because strict=true.")
    if warning:
        warning += (" The results compare it with the indexed brain slices regardless: read them "
                    "with caution, or preprocess the scan first.")
    return query, warning


def _anatomy_warning(retrieval: Retrieval, codes: Codes, lesion: bool,
                     field: str) -> str | None:
    """The learned signal beside the image rules: the image's anatomy code is unlike every
    indexed slice's (``Retrieval.anatomy_unlike``). A search reads it into its match
    percentiles and ``far_warning`` already; a compose's lesion image, whose anatomy code the
    search never reads, is checked here. Advice only, never a refusal: with the shipped model
    and an 8-patient index it also flags 9 % of synthetic and 21 % of real brain slices
    (``bench/nonbrain.py --index``)."""
    if not retrieval.anatomy_unlike(codes, lesion):
        return None
    return (f"The {field} image's anatomy is unlike every indexed slice's, farther from the "
            f"nearest one than indexed patients' slices are from each other: it may not be an "
            f"axial post-contrast T1 brain slice in the model's space (another body part, "
            f"orientation or sequence, or a scan not preprocessed like the archive's).")


def _info(query: QuerySlice, labels: np.ndarray) -> QueryInfo:
    return QueryInfo(kind=query.kind, slice=query.slice, slice_count=query.slice_count,
                     predicted_abnormal_pixels=int((labels > 0).sum()),
                     predicted_pixels={name: int((labels == value).sum())
                                       for name, value in BRATS_CLASSES.items()})


def _search(retrieval: Retrieval, space: str, codes: Codes, k: int, timings: Timings,
            weighting: str = "overlap", **filters) -> list[Hit]:
    try:
        if space == "compose":
            return retrieval.compose(codes, k, timings, weighting=weighting, **filters)
        return retrieval.search(space, codes, k, timings, **filters)
    except NotFound as exc:
        raise HTTPException(404, detail=str(exc)) from None


def _warnings(retrieval: Retrieval, space: str, hits: list[Hit], lesion: bool | None,
              *first: str | None) -> list[str]:
    """The checks' warnings (``first``, those that fired), then the archive's far warning."""
    far = retrieval.far_warning(space, hits, lesion)
    return [w for w in (*first, far) if w]


def _donor(field: str, warning: str | None) -> str | None:
    return f"The {field} image: {warning}" if warning else None


@router.post("/search", response_model=SearchResponse, summary="Search by an uploaded slice",
             responses={400: {"description": "Empty file"},
                        401: {"description": "Missing or wrong API key"},
                        404: {"description": "exclude_patient names no indexed patient"},
                        413: {"description": "Body, pixels, voxels, zip members or inflated size, "
                                              "or decoding memory over the limits"},
                        415: {"description": "Not a PNG, JPEG, NIfTI or DICOM file (or a zip of "
                                              "DICOM files)"},
                        422: {"description": "Unreadable file, not a brain slice, slice out of "
                                              "range, bad query"},
                        503: {"description": "The decoding memory stayed full; retry"}})
async def search(
    request: Request, retrieval: RetrievalDep, settings: SettingsDep,
    file: Annotated[UploadFile, File(description=UPLOAD_HELP)],
    space: SpaceQ = "normal", k: KQ = 10, slice: SliceQ = None, series: SeriesQ = None,
    exclude_patient: ExcludeQ = None, has_abnormality: AbnormalQ = None, group: GroupQ = "patient",
    preprocess: PreprocessQ = True, strict: StrictQ = False,
) -> SearchResponse:
    """The k indexed slices nearest to the upload's code in `space`, with the query's
    reconstruction, pseudo-normal (lesion removed) and predicted segmentation.

    Each neighbour carries an 8 x 8 map of how much each code position adds to its distance and
    its match percentile; `warnings` says when the upload does not look like an axial brain MRI
    slice in the model's space, and when it lies far from everything indexed (`strict=true`
    refuses the first kind with 422; the second stays advice).
    """
    _check_k(k, settings)
    _known_patient(retrieval, exclude_patient)
    await _one_file(request, "file")
    data = await _read(file)
    timings = Timings()
    request.state.timings = timings.seconds

    def work() -> SearchResponse:
        query, image_warning = _decode(request, data, slice, settings, timings, "file", strict,
                                       series, preprocess)
        drawn = retrieval.draw(query.image, timings)
        lesion = bool(drawn.labels.any())
        hits = _search(retrieval, space, drawn.codes, k, timings,
                       exclude_patient=exclude_patient, has_abnormality=has_abnormality,
                       group_by_patient=group == "patient", lesion=lesion)
        with timings.stage("render"):
            return SearchResponse(
                space=space, k=k, group=group,
                warnings=_warnings(retrieval, space, hits, lesion, image_warning),
                query=_info(query, drawn.labels),
                image=_data_url(grey_png(query.image)),
                reconstruction=_data_url(grey_png(drawn.reconstruction)),
                pseudo_normal=_data_url(grey_png(drawn.pseudo_normal)),
                segmentation=_data_url(overlay_png(query.image, drawn.labels)),
                neighbors=_neighbors(hits))

    return await run_in_threadpool(work)


@router.post("/compose", response_model=ComposeResponse,
             summary="Search by one slice's anatomy joined with another's lesion",
             responses={400: {"description": "Empty file"},
                        401: {"description": "Missing or wrong API key"},
                        404: {"description": "exclude_patient names no indexed patient"},
                        413: {"description": "Body, pixels, voxels, zip members or inflated size, "
                                              "or decoding memory over the limits"},
                        415: {"description": "Not a PNG, JPEG, NIfTI or DICOM file (or a zip of "
                                              "DICOM files)"},
                        422: {"description": "Unreadable file, not a brain slice, slice out of "
                                              "range, bad query"},
                        503: {"description": "The decoding memory stayed full; retry"}})
async def compose(
    request: Request, retrieval: RetrievalDep, settings: SettingsDep,
    normal: Annotated[UploadFile, File(description="Gives the normal (anatomy) code. "
                                                   + UPLOAD_HELP)],
    abnormal: Annotated[UploadFile, File(description="Gives the abnormal (lesion) code. "
                                                     + UPLOAD_HELP)],
    k: KQ = 10, normal_slice: SliceQ = None, abnormal_slice: SliceQ = None,
    normal_series: SeriesQ = None, abnormal_series: SeriesQ = None,
    exclude_patient: ExcludeQ = None, has_abnormality: AbnormalQ = None, group: GroupQ = "patient",
    weighting: WeightingQ = "overlap", preprocess: PreprocessQ = True, strict: StrictQ = False,
) -> ComposeResponse:
    """The normal code of `normal` joined with the abnormal code of `abnormal`, searched in the
    concat space, and the image the decoder draws from that pair with its predicted lesion.

    `weighting=overlap` (default) ranks by the anatomy of `normal` and by how well each slice's
    lesion, as the model reads it, overlaps the lesion of `abnormal`; `balanced` weighs each
    code half by its typical best-match distance; `plain` is the paper's L2 on the
    concatenated codes."""
    _check_k(k, settings)
    _known_patient(retrieval, exclude_patient)
    await _one_file(request, "normal", "abnormal")
    normal_data, abnormal_data = await _read(normal), await _read(abnormal)
    timings = Timings()
    request.state.timings = timings.seconds

    def work() -> ComposeResponse:
        nq, normal_warning = _decode(request, normal_data, normal_slice, settings, timings,
                                     "normal", strict, normal_series, preprocess)
        aq, abnormal_warning = _decode(request, abnormal_data, abnormal_slice, settings,
                                       timings, "abnormal", strict, abnormal_series, preprocess)
        nd = retrieval.draw(nq.image, timings)
        ad = retrieval.draw(aq.image, timings)
        abnormal_unlike = _anatomy_warning(retrieval, ad.codes, bool(ad.labels.any()),
                                           "abnormal")
        pair = Codes(normal=nd.codes.normal, abnormal=ad.codes.abnormal)
        image, labels = retrieval.draw_pair(pair.normal, pair.abnormal, timings)
        lesion = bool(ad.labels.any())
        hits = _search(retrieval, "compose", pair, k, timings, weighting=weighting,
                       exclude_patient=exclude_patient, has_abnormality=has_abnormality,
                       group_by_patient=group == "patient", lesion=lesion)
        space = "concat" if weighting == "plain" else "compose"
        with timings.stage("render"):
            return ComposeResponse(
                k=k, group=group, weighting=weighting, normal_query=_info(nq, nd.labels),
                abnormal_query=_info(aq, ad.labels),
                warnings=_warnings(retrieval, space, hits, lesion,
                                   _donor("normal", normal_warning),
                                   _donor("abnormal", abnormal_warning), abnormal_unlike),
                composite_pixels={name: int((labels == value).sum())
                                  for name, value in BRATS_CLASSES.items()},
                normal_image=_data_url(grey_png(nq.image)),
                abnormal_image=_data_url(grey_png(aq.image)),
                composite=_data_url(grey_png(image)),
                segmentation=_data_url(overlay_png(image, labels)),
                neighbors=_neighbors(hits))

    return await run_in_threadpool(work)


@router.post("/slices/{slice_id}/similar", response_model=SimilarResponse,
             summary="Search by an indexed slice",
             responses={401: {"description": "Missing or wrong API key"},
                        404: {"description": "No such slice or patient"}})
async def similar(
    request: Request, retrieval: RetrievalDep, settings: SettingsDep, slice_id: SliceId,
    space: SpaceQ = "normal", k: KQ = 10,
    exclude_own_patient: Annotated[bool, Query(description="Leave out the slice's own patient "
                                                           "(default true).")] = True,
    has_abnormality: AbnormalQ = None, group: GroupQ = "patient",
) -> SimilarResponse:
    """The k nearest slices to an indexed slice's stored codes (no re-encoding)."""
    _check_k(k, settings)
    timings = Timings()
    request.state.timings = timings.seconds

    def work() -> SimilarResponse:
        try:
            codes, patient = retrieval.slice_codes(slice_id)
        except NotFound as exc:
            raise HTTPException(404, detail=str(exc)) from None
        flag = retrieval.stored_flag(slice_id)
        hits = _search(retrieval, space, codes, k, timings, has_abnormality=has_abnormality,
                       exclude_patient_ids=(patient,) if exclude_own_patient else (),
                       group_by_patient=group == "patient", lesion=flag)
        return SimilarResponse(space=space, k=k, group=group, slice_id=slice_id,
                               neighbors=_neighbors(hits))

    return await run_in_threadpool(work)
