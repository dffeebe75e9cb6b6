"""Response bodies of the API (pydantic models; they are the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Space = Literal["normal", "abnormal", "concat"]
Group = Literal["slice", "patient"]

_DATA_URL = "a PNG as a data: URL (data:image/png;base64,...)"
_PNG_EXAMPLE = "data:image/png;base64,iVBORw0KGgo..."


def _example(**example) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


_NEIGHBOR = {
    "rank": 1, "slice_id": 4217, "patient_id": "BraTS20_Training_001", "slice_index": 77,
    "distance": 12.5, "match_percentile": 96.5, "has_abnormality": True,
    "image_url": "/slices/4217/image.png",
    "overlay_url": "/slices/4217/overlay.png",
    "position_distances": [[0.0] * 8] * 3 + [[0.0, 0.0, 1.5, 4.0, 2.5, 0.0, 0.0, 0.0]]
    + [[0.0, 0.0, 0.5, 3.0, 1.0, 0.0, 0.0, 0.0]] + [[0.0] * 8] * 3,
}
_QUERY = {"kind": "nifti", "slice": 77, "slice_count": 155, "predicted_abnormal_pixels": 1830,
          "predicted_pixels": {"TC": 310, "ED": 1200, "ET": 320}}
_PIXELS = ("Predicted pixels per BraTS class: TC (label 1, necrotic tumour core), ED (2, edema), "
           "ET (4, enhancing tumour).")


class Neighbor(BaseModel):
    model_config = _example(**_NEIGHBOR)

    rank: int = Field(description="1 for the nearest.")
    slice_id: int = Field(description="The slice's id (its FAISS id).")
    patient_id: str = Field(description="The patient's external id, e.g. BraTS20_Training_001.")
    slice_index: int = Field(description="Axial index in the patient's RAS+ volume.")
    distance: float = Field(description="Squared L2 distance in the searched space; for "
                                        "/compose, the ranked sum its weighting names (see "
                                        "/compose).")
    match_percentile: float | None = Field(
        None, description="Share (0-100) of this index's between-patient nearest-neighbour "
                          "distances that are at least `distance`, among sampled slices of the "
                          "query's status (with a lesion for a query with a predicted lesion, "
                          "lesion-free otherwise): 100 for an exact match, about 50 for a "
                          "typical best match in another patient, near 0 for a poor one; for an "
                          "overlap or balanced /compose, the lower of its two halves'. Null "
                          "when the index holds one patient.")
    has_abnormality: bool | None = Field(
        description="Whether the slice's ground-truth labels hold a lesion; null without labels.")
    image_url: str
    overlay_url: str | None = Field(description="Label overlay; null when the patient has none.")
    position_distances: list[list[float]] = Field(
        description="8 x 8: each code position's share of `distance` (they sum to it); row 0 is "
                    "the top of the image.")
    study_uid: str | None = Field(
        None, description="StudyInstanceUID of a patient indexed from DICOM (a folder or a PACS "
                          "over DICOMweb), to open the study in a viewer; null for NIfTI "
                          "cohorts. No patient name or id from DICOM tags is kept.")
    series_uid: str | None = Field(
        None, description="SeriesInstanceUID of the series indexed; null for NIfTI cohorts.")


class QueryInfo(BaseModel):
    model_config = _example(**_QUERY)

    kind: Literal["png", "jpeg", "nifti", "dicom", "indexed"]
    slice: int | None = Field(None, description="Axial slice read (NIfTI, multi-frame DICOM).")
    slice_count: int | None = Field(None, description="Axial slices in the uploaded volume.")
    predicted_abnormal_pixels: int = Field(
        description="Pixels the segmentation decoder assigns to TC, ED or ET.")
    predicted_pixels: dict[str, int] = Field(description=_PIXELS)


class SearchResponse(BaseModel):
    model_config = _example(space="normal", k=1, group="patient", warnings=[], query=_QUERY,
                            image=_PNG_EXAMPLE, reconstruction=_PNG_EXAMPLE,
                            pseudo_normal=_PNG_EXAMPLE, segmentation=_PNG_EXAMPLE,
                            neighbors=[_NEIGHBOR])

    space: Space
    k: int
    group: Group
    warnings: list[str] = Field(
        description="Said in words when the results may mean little, e.g. the nearest slice "
                    "lies many times farther than this index's typical nearest neighbour.")
    query: QueryInfo
    image: str = Field(description=f"The query slice as the model sees it, {_DATA_URL}.")
    reconstruction: str = Field(description=f"x_hat+ (both codes), {_DATA_URL}.")
    pseudo_normal: str = Field(description=f"x_hat- (normal code alone), {_DATA_URL}.")
    segmentation: str = Field(description=f"Predicted lesion over the query, {_DATA_URL}.")
    neighbors: list[Neighbor]


class ComposeResponse(BaseModel):
    model_config = _example(space="concat", k=1, group="patient", warnings=[],
                            normal_query=_QUERY | {"kind": "png", "slice": None,
                                                   "slice_count": None},
                            abnormal_query=_QUERY, composite_pixels=_QUERY["predicted_pixels"],
                            normal_image=_PNG_EXAMPLE, abnormal_image=_PNG_EXAMPLE,
                            composite=_PNG_EXAMPLE, segmentation=_PNG_EXAMPLE,
                            neighbors=[_NEIGHBOR])

    space: Literal["concat"] = "concat"
    k: int
    group: Group
    weighting: Literal["overlap", "balanced", "plain"] = Field(
        "overlap", description="How the two halves of the composed code count (see /compose).")
    warnings: list[str] = Field(description="As in SearchResponse.")
    normal_query: QueryInfo
    abnormal_query: QueryInfo
    composite_pixels: dict[str, int] = Field(
        description="The composite's predicted lesion (from the abnormal code): " + _PIXELS)
    normal_image: str = Field(description=f"The query giving the normal code, {_DATA_URL}.")
    abnormal_image: str = Field(description=f"The query giving the abnormal code, {_DATA_URL}.")
    composite: str = Field(description=f"The image drawn from the pair, {_DATA_URL}.")
    segmentation: str = Field(description=f"The abnormal code's lesion over the composite, "
                                          f"{_DATA_URL}.")
    neighbors: list[Neighbor]


class SimilarResponse(BaseModel):
    space: Space
    k: int
    group: Group
    slice_id: int
    neighbors: list[Neighbor]


class SliceInfo(BaseModel):
    slice_id: int
    patient_id: str
    slice_index: int
    has_abnormality: bool | None
    area_tc: int | None = Field(description="Pixels of BraTS label 1 (necrotic tumour core).")
    area_ed: int | None = Field(description="Pixels of BraTS label 2 (edema).")
    area_et: int | None = Field(description="Pixels of BraTS label 4 (enhancing tumour).")
    brain_area: int = Field(description="Pixels > 0 in the 256 x 256 slice.")
    image_url: str
    overlay_url: str | None
    normal_codes: list[list[int]] = Field(description="8 x 8 rows of the normal codebook.")
    abnormal_codes: list[list[int]] = Field(description="8 x 8 rows of the abnormal codebook.")


class PatientSlice(BaseModel):
    slice_id: int
    slice_index: int
    has_abnormality: bool | None


class PatientSummary(BaseModel):
    patient_id: str
    slice_count: int
    lesion_slices: int = Field(description="Slices whose ground-truth labels hold a lesion.")
    has_labels: bool


class PatientInfo(BaseModel):
    patient_id: str
    cohort: str
    slice_count: int
    added_at: datetime
    has_labels: bool
    study_uid: str | None = Field(None, description="StudyInstanceUID of a patient indexed from "
                                                    "DICOM (then also its patient_id); null for "
                                                    "NIfTI cohorts.")
    series_uid: str | None = Field(None, description="SeriesInstanceUID of the series indexed.")
    slices: list[PatientSlice]


class ExampleSlice(BaseModel):
    slice_id: int
    patient_id: str
    slice_index: int


class IndexInfo(BaseModel):
    model_config = _example(patients=40, slices=5412, abnormal_slices=1520, generation=3,
                            preset="small", checkpoint_sha256="3f2a" + "0" * 60,
                            spaces=["normal", "abnormal", "concat"], default_k=10, max_k=100,
                            max_upload_mb=32.0, auth_required=True, faiss_gpu=False)

    patients: int
    slices: int
    abnormal_slices: int
    generation: int
    preset: str
    checkpoint_sha256: str
    spaces: list[Space]
    default_k: int
    max_k: int
    max_upload_mb: float
    auth_required: bool
    faiss_gpu: bool
    model_note: str | None = Field(None, description="The checkpoint's note for users, e.g. what "
                                                     "it was trained on and its limits.")
    model_card: bool = Field(False, description="Whether GET /model-card serves the checkpoint's "
                                                "model card (Markdown).")
    eval_headline: dict[str, Any] | None = Field(
        None, description="Headline figures of a `cbir eval` run of the served weights, as "
                          "the checkpoint carries them (k, then per figure the model, raw-pixel, "
                          "random and oracle values; the command that produced them).")
    typical_distance: dict[str, float] | None = Field(
        None, description="Median distance from an indexed slice to its nearest slice of another "
                          "patient, per space (sampled at load); what match_percentile is read "
                          "against. Null when the index holds one patient.")
    example: ExampleSlice | None = Field(
        None, description="The slice the page's 'Try an example' searches with: the labelled "
                          "lesion slice whose first 5 results in the abnormal space (one per "
                          "other patient) hold the most lesions and lie nearest, so that they "
                          "show what a good match looks like in this index. Null without a "
                          "labelled lesion slice or a second patient.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready"]
    generation: int = Field(description="The generation served.")
    slices: int
    active_generation: int | None = Field(
        description="The catalogue's active generation: past the one served for the second or "
                    "so a new one takes to load, or while it is refused.")
    refused: str | None = Field(
        None, description="Why the active generation could not be loaded (the one served "
                          "keeps serving until another generation becomes active).")
