"""A composed query finds "this anatomy with that lesion", with the shipped checkpoint.

The other compose tests run on an untrained checkpoint, where only invariants hold. Here the
index is the session cohort encoded by ``checkpoints/cbir-cpu.pt``, and the two donors pull apart
on purpose: the anatomy donor is a lesion-free slice; the lesion donor, the cohort's largest
lesion, lies at least 20 levels away; a third patient has a lesion at the anatomy donor's level
(the answer exists). Both go up as 16-bit PNGs. The composed top 5 must be nearer the anatomy
donor's level than the lesion donor's own abnormal-space neighbours are, and hold lesions more
often than the anatomy donor's normal-space neighbours do: each half of the query counts. Both
through the API and on the page (the slice numbers and lesion badges a reader sees).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ingest.layouts import find_cases
from ingest.volumes import load_case
from model.data.dataset import case_slices
from model.data.preprocess import slice_to_png
from service.config import Settings
from tests.service.conftest import _serve

K = 5
MIN_LEVEL_GAP = 20
MID_LEVEL = 77  # the middle of the 155 axial levels: anatomy donors from the mid-brain first


XFAIL = pytest.mark.xfail(strict=True, reason=(
    "issue 22, open: with the shipped checkpoint (stage 7, the mean of runs S and R) and the "
    "overlap weighting (the default from 2026-12-08) the composed top 5 are the anatomy "
    "donor's own lesion-free slices (levels 79-83 for a donor at level 81: its exact anatomy "
    "outweighs a lesion overlap the model reads; excluding that patient, 1 of 5 holds a "
    "lesion); with the balanced weighting they were the lesion donor's own abnormal-space "
    "neighbours, 2 of them with a lesion (levels 61-106, median 18 away; measured "
    "2026-12-07); with stage 6 they held lesions at levels 60-83 (median 11 away), with stage 5 "
    "at levels 53-71 "
    "(median 20 away), with stage 4 at levels 57-95 (median 18 away); with stage 3 only 2 of "
    "them held a lesion, with stage 2 they were the lesion donor's own neighbours; a checkpoint "
    "that composes must pass this"))


@dataclass(frozen=True)
class Donor:
    patient_id: str
    slice_index: int
    png: Path  # the slice as a 16-bit PNG, as a reader exports it from a viewer


@pytest.fixture(scope="module")
def donors(synth_cohort, tmp_path_factory) -> tuple[Donor, Donor]:
    """(anatomy donor, lesion donor): the lesion donor is the cohort's largest lesion; the
    anatomy donor a lesion-free slice of another patient, MIN_LEVEL_GAP or more levels away,
    at a level where a third patient has a lesion (so "this anatomy with that lesion" exists)."""
    stacks = {c.pid: case_slices(load_case(c, with_healthy=False))
              for c in find_cases(synth_cohort).cases}
    area = {(pid, int(s.slice_index[i])): int((s.abnormal[i] > 0).sum())
            for pid, s in stacks.items() for i in range(len(s.slice_index))}
    lesion = max(area, key=area.get)
    lesion_levels = {(p, z) for (p, z), a in area.items() if a > 0 and p != lesion[0]}
    for pid, level in sorted(area, key=lambda key: (abs(key[1] - MID_LEVEL), key)):
        if (pid == lesion[0] or area[(pid, level)] or abs(level - lesion[1]) < MIN_LEVEL_GAP
                or not any(p != pid and abs(z - level) <= 2 for p, z in lesion_levels)):
            continue
        out = tmp_path_factory.mktemp("donors")
        picked = []
        for who, z in ((pid, level), lesion):
            s = stacks[who]
            png = out / f"{who}-{z}.png"
            png.write_bytes(slice_to_png(s.image[int(np.flatnonzero(s.slice_index == z)[0])],
                                         bits=16))
            picked.append(Donor(who, z, png))
        return picked[0], picked[1]
    raise AssertionError("the cohort should hold a lesion-free slice far from the largest "
                         "lesion, at the level of another patient's lesion")


def _upload(donor: Donor, role: str) -> tuple[str, tuple[str, bytes, str]]:
    return role, (donor.png.name, donor.png.read_bytes(), "image/png")


def _compose(client, anatomy: Donor, lesion: Donor) -> list[dict]:
    r = client.post(f"/compose?k={K}&group=slice",
                    files=[_upload(anatomy, "normal"), _upload(lesion, "abnormal")])
    assert r.status_code == 200, r.text
    return r.json()["neighbors"]


def _search(client, donor: Donor, space: str) -> list[dict]:
    r = client.post(f"/search?space={space}&k={K}&group=slice", files=[_upload(donor, "file")])
    assert r.status_code == 200, r.text
    return r.json()["neighbors"]


def _level_gap(levels, anatomy: Donor) -> float:
    return float(np.median([abs(z - anatomy.slice_index) for z in levels]))


def _assert_both_halves_count(levels: list[int], lesions: list[bool], anatomy_only: list[dict],
                              lesion_only: list[dict], anatomy: Donor) -> None:
    lesion_share = sum(lesions) / len(lesions)
    baseline_share = sum(bool(n["has_abnormality"]) for n in anatomy_only) / len(anatomy_only)
    assert lesion_share >= 0.6 and lesion_share > baseline_share, (lesions, baseline_share)
    gap = _level_gap(levels, anatomy)
    lesion_gap = _level_gap([n["slice_index"] for n in lesion_only], anatomy)
    assert gap <= 8 and gap < lesion_gap, (levels, anatomy.slice_index, lesion_gap)


@XFAIL
def test_composed_query_keeps_the_anatomy_level_and_the_lesion(shipped_client, donors):
    anatomy, lesion = donors
    hits = _compose(shipped_client, anatomy, lesion)
    assert len(hits) == K
    _assert_both_halves_count(
        [n["slice_index"] for n in hits], [bool(n["has_abnormality"]) for n in hits],
        _search(shipped_client, anatomy, "normal"), _search(shipped_client, lesion, "abnormal"),
        anatomy)


@XFAIL
def test_page_composes_the_same_way(shipped_index, shipped_client, donors):
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.service.test_web import CHROMIUM, TIMEOUT_MS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs {CHROMIUM} (Debian package chromium)")  # test_web fails under CI
    anatomy, lesion = donors
    url, server, thread = _serve(Settings(index_dir=shipped_index))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/")
            sync_api.expect(page.locator("body")).to_have_attribute("data-state", "ready")
            page.click("#mode-compose")
            page.fill("#compose-k", str(K))
            page.uncheck("#compose-group-patient")  # one hit per slice, as the API call below
            page.set_input_files("#compose-normal-input", str(anatomy.png))
            with page.expect_response(lambda r: "/compose?" in r.url) as response:
                page.set_input_files("#compose-abnormal-input", str(lesion.png))
            assert response.value.ok, response.value.text()
            cards = page.locator("#compose-neighbors .neighbor-card")
            sync_api.expect(cards).to_have_count(K)
            levels = [int(t) for t in cards.locator(".slice").all_text_contents()]
            badges = cards.locator(".badge").all_text_contents()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    api = _compose(shipped_client, anatomy, lesion)
    assert levels == [n["slice_index"] for n in api]
    lesions = [b.strip() == "lesion" for b in badges]  # or "no lesion"
    assert lesions == [bool(n["has_abnormality"]) for n in api], badges
    _assert_both_halves_count(levels, lesions, _search(shipped_client, anatomy, "normal"),
                              _search(shipped_client, lesion, "abnormal"), anatomy)
