"""The page shows a DICOM-sourced hit's StudyInstanceUID and SeriesInstanceUID (to open it in a
viewer), and nothing of the kind for a NIfTI-sourced one; a .zip of the series is the query."""

from __future__ import annotations

import pytest

from service.config import Settings
from tests.ingest.series import zip_of
from tests.service import test_web
from tests.service.conftest import _serve
from tests.service.test_web import (  # noqa: F401
    browser,
    cards,
    errors,
    expect,
    open_app,
    page,
    upload_and_wait,
)

pytestmark = getattr(test_web, "pytestmark", [])  # skipped where the page tests are


@pytest.fixture(scope="module")
def dicom_server(dicom_index):
    url, server, thread = _serve(Settings(index_dir=dicom_index.index))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_a_dicom_hit_shows_its_study_and_series_uids(page, dicom_server,  # noqa: F811
                                                     dicom_index, tmp_path):
    upload = tmp_path / "series.zip"
    upload.write_bytes(zip_of(dicom_index.datasets))
    open_app(page, dicom_server)
    body = upload_and_wait(page, upload, k=2, space="concat")
    assert body["query"]["kind"] == "dicom"
    # The series is a volume: the slice slider is offered, as for a NIfTI upload.
    expect(page.locator("#slice-control")).to_be_visible()
    expect(page.locator("#slice-value")).to_have_text("77 / 154")
    first, second = cards(page).nth(0), cards(page).nth(1)
    assert first.locator(".patient").inner_text() == dicom_index.study_uid
    expect(first.locator(".meta-dicom")).to_be_visible()
    expect(first.locator(".study-uid")).to_have_text(dicom_index.study_uid)
    expect(first.locator(".series-uid")).to_have_text(dicom_index.series_uid)
    assert second.locator(".patient").inner_text() == "PHANTOM0"
    expect(second.locator(".meta-dicom")).to_be_hidden()
    patient = page.request.get(f"{dicom_server}/patients/{dicom_index.study_uid}").json()
    assert (patient["study_uid"], patient["series_uid"]) == (dicom_index.study_uid,
                                                             dicom_index.series_uid)
