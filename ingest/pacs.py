"""Series pulled from a PACS over DICOMweb (``dicomweb-client``): QIDO-RS to find studies and
series, WADO-RS to fetch them.

Per study, the series is chosen by the same rule as in a folder (``ingest.dicom.pick_series``),
from each series' metadata (headers without pixels), so a study pulled from the PACS and the
same study exported to a folder give the same series. Only the chosen series' instances are
fetched, one series at a time. Nothing read here is logged but UIDs and counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import requests

from ingest import dicom

log = logging.getLogger(__name__)

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"


def public_url(url: str) -> str:
    """``url`` without user name and password: what may be stored and shown."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def _datasets(metadata: list[dict]) -> list:
    from pydicom import Dataset

    # Bulk data (pixels) is not in the metadata; references to it are left out.
    return [Dataset.from_json(item, bulk_data_uri_handler=lambda *_: b"") for item in metadata]


class DicomWebSource:
    """The studies and series of one DICOMweb server."""

    def __init__(self, url: str, client=None):
        from dicomweb_client.api import DICOMwebClient

        self.url = public_url(url)
        self.client = client or DICOMwebClient(url=url)

    def studies(self) -> list[str]:
        found = self.client.search_for_studies(get_remaining=True)
        return [uid for item in found if (uid := _value(item, STUDY_UID))]

    def study_of(self, series_uid: str) -> str:
        found = self.client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        studies = {_value(item, STUDY_UID) for item in found} - {None}
        if len(studies) != 1:
            raise dicom.SeriesChoice(f"series {series_uid} is not on {self.url}"
                                     if not studies else
                                     f"series {series_uid} is in {len(studies)} studies")
        return studies.pop()

    def series_path(self, study_uid: str, series_uid: str) -> str:
        return f"{self.url}/studies/{study_uid}/series/{series_uid}"

    def pick(self, study_uid: str, series_uid: str | None = None) -> dicom.SeriesInfo:
        """The series of ``study_uid`` the folder rule picks, read from headers only."""
        found = self.client.search_for_series(study_instance_uid=study_uid, get_remaining=True)
        infos = []
        for item in found:
            uid = _value(item, SERIES_UID)
            if uid is None:
                continue
            metadata = self.client.retrieve_series_metadata(study_uid, uid)
            with dicom.readable():
                headers = dicom.group_series(_datasets(metadata))
                infos += [dicom.describe(group) for group in headers.values()]
        return dicom.pick_series(infos, series_uid)

    def read(self, study_uid: str, series_uid: str) -> dicom.DicomVolume:
        datasets = self.client.retrieve_series(study_uid, series_uid)
        log.info("fetched %d instance(s) of series %s", len(datasets), series_uid)
        where = self.series_path(study_uid, series_uid)
        with dicom.readable():
            info = dicom.describe(datasets)
            volume = dicom.series_volume(datasets, where)
        return dicom.DicomVolume(volume=volume, study_uid=study_uid, series_uid=series_uid,
                                 description=info.description, source=where)

    def pull(self, study_uids: list[str] | None = None,
             series_uid: str | None = None) -> Iterator[dicom.DicomVolume | tuple[str, str]]:
        """One volume per study (or ``(where, problem)`` for a study that gives none):
        ``study_uids`` (default: every study on the server), or the study holding
        ``series_uid``, whose series is then that one."""
        if series_uid is not None and not study_uids:
            study_uids = [self.study_of(series_uid)]
        for study in study_uids or self.studies():
            where = f"{self.url}/studies/{study}"
            try:
                info = self.pick(study, series_uid)
                yield self.read(study, info.series_uid)
            except dicom.DicomError as exc:
                yield where, str(exc)
            except requests.RequestException as exc:
                yield where, f"the DICOMweb server answered {exc}"
