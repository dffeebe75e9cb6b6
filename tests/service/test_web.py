"""The web page in a real browser (Debian's headless Chromium driven by Playwright) against the
real app served by uvicorn: search, NIfTI slice slider, compose, errors, API key, position maps.
Any uncaught JS error or unexpected console error fails the test."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from model.checkpoint import export_checkpoint
from service.config import Settings
from tests.service.conftest import _serve

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"  # Debian's package; no `playwright install`
TIMEOUT_MS = 30_000  # searches run the model on a shared 2-core CPU

if not Path(CHROMIUM).exists():
    # CI (.ci/run) installs Chromium and sets CBIR_REQUIRE_BROWSER=1: there, absence fails.
    if os.environ.get("CBIR_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"CBIR_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
    pytestmark = pytest.mark.skip(reason=f"needs {CHROMIUM} (Debian package chromium)")
expect.set_options(timeout=TIMEOUT_MS)

QUERY_ROLES = ("image", "reconstruction", "pseudo_normal", "segmentation")


class PageErrors:
    """Uncaught exceptions and console errors of one page. Chromium logs every failed fetch as
    'Failed to load resource: ...'; a test that provokes one allows its text ("status of 415")."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.allowed: list[str] = []

    def on_console(self, msg) -> None:
        if msg.type == "error" and not any(text in msg.text for text in self.allowed):
            self.messages.append(f"console.error: {msg.text}")

    def on_page_error(self, exc) -> None:
        self.messages.append(f"uncaught: {exc}")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def page(browser, errors):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", errors.on_console)
    page.on("pageerror", errors.on_page_error)
    yield page
    context.close()
    assert not errors.messages, errors.messages


def open_app(page, base_url: str) -> None:
    page.goto(base_url + "/")
    expect(page.locator("body")).to_have_attribute("data-state", "ready")
    expect(page.locator("#model-note")).to_be_hidden()  # the test checkpoint carries no note


def search_response(page, **params):
    """Context manager waiting for the POST /search whose query holds ``params``."""
    def match(response) -> bool:
        if "/search?" not in response.url or response.request.method != "POST":
            return False
        return all(f"{k}={v}" in response.url for k, v in params.items())
    return page.expect_response(match)


def cards(page, grid: str = "#neighbors"):
    return page.locator(f"{grid} .neighbor-card")


def _number(text: str) -> float:
    """A distance as the page shows it: no exponent, thousands separators from 1,000."""
    assert "e" not in text.lower(), text
    return 0.0 if text.startswith("<") else float(text.replace(",", ""))


def distances(page, grid: str = "#neighbors") -> list[float]:
    return [_number(t) for t in page.locator(f"{grid} .neighbor-card .distance").all_inner_texts()]


def wait_first_image(page, grid: str = "#neighbors") -> None:
    page.wait_for_function(
        """grid => { const img = document.querySelector(grid + ' .neighbor-card .neighbor-image');
                     return img && img.complete && img.naturalWidth > 0; }""", arg=grid)


def upload_and_wait(page, path: Path, k: int, space: str = "normal"):
    page.select_option("#space", space)
    page.fill("#k", str(k))
    with search_response(page, space=space, k=k) as response:
        page.set_input_files("#file-input", str(path))
    assert response.value.ok, response.value.text()
    expect(cards(page)).to_have_count(k)
    return response.value.json()


def test_search_shows_query_images_and_neighbours(page, live_server, indexed_png,
                                                  indexed_slices):
    open_app(page, live_server)
    assert "patients" in page.inner_text("#index-stats")
    upload_and_wait(page, indexed_png, k=4)

    for role in QUERY_ROLES:
        img = page.locator(f"#query-panel img[data-role={role}]")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert img.get_attribute("alt")
    expect(page.locator("#query-info")).to_contain_text("space normal, k 4")

    # The slice the PNG was exported from comes back first, at distance ~0.
    first = cards(page).first
    indexed = indexed_slices[0]
    assert first.get_attribute("data-slice-id") == str(indexed.slice_id)
    assert first.locator(".patient").inner_text() == indexed.patient_id
    assert first.locator(".slice").inner_text() == str(indexed.slice_index)
    found = distances(page)
    assert found[0] < 1e-3 and found == sorted(found)
    expect(first.locator(".badge")).to_have_text("lesion")

    wait_first_image(page)
    image = first.locator(".neighbor-image")
    assert image.get_attribute("src").startswith("blob:")
    assert image.evaluate("img => img.naturalWidth") == 256
    expect(page.locator("#search-button")).to_be_enabled()


def test_changing_the_space_resends_and_replaces_results(page, live_server, indexed_png,
                                                         indexed_slices, errors):
    errors.allowed.append("ERR_FILE_NOT_FOUND")  # the probe of a revoked object URL, below
    open_app(page, live_server)
    upload_and_wait(page, indexed_png, k=4)
    wait_first_image(page)
    old_blob = cards(page).first.locator(".neighbor-image").get_attribute("src")
    seen = {"normal": distances(page)}

    for space in ("abnormal", "concat"):
        with search_response(page, space=space, k=4) as response:
            page.select_option("#space", space)
        body = response.value.json()
        expect(page.locator("#query-info")).to_contain_text(f"space {space}, k 4")
        expect(cards(page)).to_have_count(4)
        shown = distances(page)
        for text, n in zip(shown, body["neighbors"], strict=True):
            assert text == pytest.approx(n["distance"], rel=5e-3, abs=0.5)
        assert shown[0] < 1e-3
        assert cards(page).first.get_attribute("data-slice-id") == str(indexed_slices[0].slice_id)
        seen[space] = shown
    assert seen["normal"] != seen["abnormal"] != seen["concat"]
    expect(page.locator("#space-help")).to_contain_text("Both")

    # The replaced grid's object URLs are revoked.
    assert page.evaluate("url => fetch(url).then(() => true, () => false)", old_blob) is False


def test_nifti_upload_shows_a_slice_slider_that_resends(page, live_server, indexed_nifti,
                                                        indexed_slices):
    open_app(page, live_server)
    body = upload_and_wait(page, indexed_nifti, k=3)
    query = body["query"]
    assert query["kind"] == "nifti" and query["slice_count"] > 1
    slider = page.locator("#slice-slider")
    expect(page.locator("#slice-control")).to_be_visible()
    assert slider.get_attribute("max") == str(query["slice_count"] - 1)
    assert slider.input_value() == str(query["slice"])
    expect(page.locator("#query-slice")).to_have_attribute("data-slice", str(query["slice"]))

    # The indexed slice of this patient, chosen on the slider, finds itself.
    target = indexed_slices[0].slice_index
    assert target != query["slice"], "pick a slice other than the middle one"
    with search_response(page, slice=target) as response:
        slider.fill(str(target))
    assert response.value.json()["query"]["slice"] == target
    expect(page.locator("#query-slice")).to_have_attribute("data-slice", str(target))
    expect(cards(page).first).to_have_attribute("data-slice-id",
                                                str(indexed_slices[0].slice_id))
    assert distances(page)[0] < 1e-3


def test_compose_two_images(page, live_server, indexed_png, other_png):
    open_app(page, live_server)
    page.click("#mode-compose")
    expect(page.locator("#compose-view")).to_be_visible()
    expect(page.locator("#search-view")).to_be_hidden()
    page.fill("#compose-k", "4")
    page.set_input_files("#compose-normal-input", str(indexed_png))
    with page.expect_response(lambda r: "/compose?" in r.url) as response:
        page.set_input_files("#compose-abnormal-input", str(other_png))
    assert response.value.ok, response.value.text()
    assert "k=4" in response.value.url

    composite = page.locator("#composite")
    expect(composite).to_be_visible()
    assert composite.get_attribute("src").startswith("data:image/png;base64,")
    sources = {role: page.locator(f"#compose-panel img[data-role={role}]").get_attribute("src")
               for role in ("normal_image", "abnormal_image", "composite", "segmentation")}
    assert all(s.startswith("data:image/png") for s in sources.values())
    assert sources["normal_image"] != sources["abnormal_image"]
    expect(cards(page, "#compose-neighbors")).to_have_count(4)
    found = distances(page, "#compose-neighbors")
    assert found == sorted(found)
    wait_first_image(page, "#compose-neighbors")


def test_search_and_compose_write_a_large_distance_alike(page, live_server, indexed_png,
                                                        other_png, monkeypatch):
    """Item 11: one number format in both grids, also from 1,000 up. The test index's own
    distances stay below 1,000, so the server (in this process) reports larger ones."""
    import dataclasses

    from service.retrieval import Retrieval

    large = [2560.4, 2561.4, 123456.7]
    search = Retrieval.search

    def far(self, *args, **kwargs):
        hits = search(self, *args, **kwargs)
        return [dataclasses.replace(h, distance=d) for h, d in zip(hits, large, strict=False)]

    compose = Retrieval.compose

    def far_composed(self, *args, **kwargs):
        hits = compose(self, *args, **kwargs)
        return [dataclasses.replace(h, distance=d) for h, d in zip(hits, large, strict=False)]

    monkeypatch.setattr(Retrieval, "search", far)
    monkeypatch.setattr(Retrieval, "compose", far_composed)
    open_app(page, live_server)
    upload_and_wait(page, indexed_png, k=3)
    searched = page.locator("#neighbors .neighbor-card .distance").all_inner_texts()
    page.click("#mode-compose")
    page.fill("#compose-k", "3")
    page.set_input_files("#compose-normal-input", str(indexed_png))
    with page.expect_response(lambda r: "/compose?" in r.url):
        page.set_input_files("#compose-abnormal-input", str(other_png))
    expect(cards(page, "#compose-neighbors")).to_have_count(3)
    composed = page.locator("#compose-neighbors .neighbor-card .distance").all_inner_texts()
    assert searched == composed == ["2,560", "2,561", "123,457"]


def test_unsupported_upload_shows_the_servers_detail(page, live_server, errors, tmp_path):
    errors.allowed.append("status of 415")
    note = tmp_path / "note.txt"
    note.write_bytes(b"hello")
    open_app(page, live_server)
    url = page.url
    with search_response(page) as response:
        page.set_input_files("#file-input", str(note))
    assert response.value.status == 415
    detail = response.value.json()["detail"]
    assert isinstance(detail, str) and detail

    banner = page.locator("#error")
    expect(banner).to_be_visible()
    assert banner.get_attribute("role") == "alert"
    expect(banner).to_contain_text(detail)
    expect(banner).to_contain_text("415")
    assert page.url == url
    expect(page.locator("#search-results")).to_be_hidden()
    expect(page.locator("#search-button")).to_be_enabled()


def test_api_key_is_asked_for_and_sent(page, live_server_with_key, errors, indexed_png):
    errors.allowed.append("status of 401")
    base_url, key = live_server_with_key
    page.goto(base_url + "/")
    expect(page.locator("body")).to_have_attribute("data-state", "auth")
    expect(page.locator("#api-key")).to_be_visible()
    assert page.get_attribute("#api-key", "type") == "password"
    expect(page.locator("#file-input")).to_be_disabled()

    page.fill("#api-key", "not-the-key")
    page.click("#api-key-submit")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("wrong API key")
    expect(page.locator("#api-key")).to_be_visible()

    page.fill("#api-key", key)
    page.click("#api-key-submit")
    expect(page.locator("body")).to_have_attribute("data-state", "ready")
    expect(page.locator("#auth-panel")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('cbir-api-key')") == key
    assert page.evaluate("localStorage.length") == 0

    upload_and_wait(page, indexed_png, k=3)
    wait_first_image(page)  # the image fetch carried the key too


def test_position_maps_and_label_overlays(page, live_server, indexed_png):
    open_app(page, live_server)
    body = upload_and_wait(page, indexed_png, k=3)
    wait_first_image(page)
    first_map = cards(page).nth(0).locator("canvas.position-map")
    second_map = cards(page).nth(1).locator("canvas.position-map")
    expect(first_map).to_be_hidden()
    expect(second_map).to_be_hidden()

    # Hover shows one card's map; the global toggle shows them all.
    page.mouse.move(0, 0)
    cards(page).nth(1).locator(".thumb").hover()
    expect(second_map).to_be_visible()
    expect(cards(page).nth(1).locator(".cell-readout")).to_contain_text("position (")
    page.mouse.move(0, 0)
    expect(second_map).to_be_hidden()
    page.check("#toggle-position-maps")
    expect(first_map).to_be_visible()
    expect(second_map).to_be_visible()

    # Alpha follows value / the largest cell of all cards (one shared scale, shown in the
    # legend), row 0 at the top: a zero cell is clear.
    grid = body["neighbors"][1]["position_distances"]
    flat = [(v, r, c) for r, row in enumerate(grid) for c, v in enumerate(row)]
    _, r, c = max(flat)
    top = max(v for n in body["neighbors"] for row in n["position_distances"] for v in row)
    assert top > 0
    legend = page.locator("#search-map-legend")
    expect(legend).to_be_visible()
    assert float(legend.get_attribute("data-max")) == pytest.approx(top)

    def alpha(canvas, row: int, col: int) -> int:
        return canvas.evaluate(
            """(cv, [r, c]) => cv.getContext('2d')
                 .getImageData(c * 32 + 16, r * 32 + 16, 1, 1).data[3]""", [row, col])

    assert abs(alpha(second_map, r, c) - round(0.8 * 255 * grid[r][c] / top)) <= 2
    low, lr, lc = min(flat)
    assert alpha(second_map, lr, lc) == pytest.approx(0.8 * 255 * low / top, abs=2)
    assert all(alpha(first_map, row, col) == 0 for row in range(8) for col in (0, 4, 7))

    # Label overlays: fetched with the same headers, shown over the images, with the legend.
    overlay = cards(page).first.locator("img.label-overlay")
    expect(overlay).to_be_hidden()
    legend = page.locator("#search-results .overlay-legend")
    expect(legend).to_be_hidden()
    page.check("#toggle-overlays")
    expect(overlay).to_be_visible()
    assert overlay.get_attribute("src").startswith("blob:")
    expect(legend).to_be_visible()
    for name in ("TC", "ED", "ET"):
        expect(legend).to_contain_text(name)


def test_more_like_this_searches_by_the_indexed_slice(page, live_server, indexed_png):
    open_app(page, live_server)
    body = upload_and_wait(page, indexed_png, k=3, space="concat")
    picked = body["neighbors"][1]
    with page.expect_response(
            lambda r: f"/slices/{picked['slice_id']}/similar?" in r.url) as response:
        cards(page).nth(1).locator(".similar-button").click()
    assert response.value.ok and "space=concat" in response.value.url
    expect(page.locator("#search-title")).to_contain_text(f"patient {picked['patient_id']}")
    # The upload box names the query now, not the file uploaded before.
    expect(page.locator("#file-name")).to_have_text(
        f"Query: indexed slice, patient {picked['patient_id']}, slice {picked['slice_index']}")
    expect(cards(page)).to_have_count(3)
    # The server leaves out the slice's own patient by default.
    shown = page.locator("#neighbors .neighbor-card .patient").all_inner_texts()
    assert picked["patient_id"] not in shown
    page.wait_for_function(
        "() => { const i = document.querySelector('#query-panel img[data-role=image]');"
        " return i && i.complete && i.naturalWidth > 0; }")


def test_a_checkpoint_note_shows_in_the_header_as_text(page, service_index, tiny_checkpoint,
                                                       tmp_path):
    """A checkpoint's note (cbir export-checkpoint --note) reaches the reader, served
    from a real exported copy with the index's weights; markup in it stays text."""
    note = "synthetic <b>training</b> data only. See noted.md."
    noted = tmp_path / "noted.pt"
    export_checkpoint(tiny_checkpoint, noted, note=note)
    card = "# Model card: `noted.pt`\n\nTrained on <i>phantoms</i>.\n"
    noted.with_suffix(".md").write_text(card)
    url, server, thread = _serve(Settings(index_dir=service_index, checkpoint=noted))
    try:
        page.goto(url + "/")
        expect(page.locator("body")).to_have_attribute("data-state", "ready")
        expect(page.locator("#model-note")).to_be_visible()
        expect(page.locator("#model-note-text")).to_have_text(f"Model: {note}")
        assert page.locator("#model-note b").count() == 0
        # The card the note points to opens on the page, as text.
        page.click("#model-card-open")
        dialog = page.locator("#model-card")
        expect(dialog).to_be_visible()
        expect(page.locator("#model-card-text")).to_have_text(card.rstrip("\n"))
        assert page.locator("#model-card-text i").count() == 0
        page.click("#model-card-close")
        expect(dialog).to_be_hidden()
    finally:
        # The page goes first: thumbnails still loading from a stopped server would log
        # ERR_CONNECTION_REFUSED (seen once in CI).
        page.close()
        server.should_exit = True
        thread.join(timeout=10)


def test_orientation_markers_and_the_predicted_lesion_panel(page, live_server, indexed_png,
                                                           indexed_nifti):
    open_app(page, live_server)
    # A volume's orientation is in its header: the four query figures and each neighbour.
    body = upload_and_wait(page, indexed_nifti, k=3)
    wait_first_image(page)
    expect(page.locator("#query-panel .ori")).to_have_count(16)
    for frame in [*page.locator("#query-panel .oriented").all(),
                  *page.locator("#neighbors .thumb").all()]:
        marks = frame.locator(".ori")
        assert marks.all_inner_texts() == ["A", "P", "R", "L"]
        box, left = frame.bounding_box(), frame.locator(".ori-left").bounding_box()
        assert left["x"] < box["x"] + box["width"] / 4  # R on the image's left
    pixels = body["query"]["predicted_pixels"]
    panel = page.locator("#query-panel figure:has(img[data-role=segmentation])")
    if sum(pixels.values()):
        for name in ("TC", "ED", "ET"):
            expect(panel.locator(".lesion-legend")).to_contain_text(f"{name} ")
        expect(panel.locator(".lesion-legend")).to_contain_text(f"{pixels['TC']:,} px")
    else:
        expect(panel.locator(".no-lesion")).to_have_text("No lesion predicted")
    # Similarity beside the raw distance, as a percentage of the index's best matches.
    first = cards(page).first
    percentile = body["neighbors"][0]["match_percentile"]
    assert first.locator(".match").inner_text() == f"{math.floor(percentile + 0.5)}%"
    # A PNG says nothing of its orientation: no markers on its figures; indexed slices keep them.
    with page.expect_response(lambda r: "/search?" in r.url and "slice=" not in r.url):
        page.set_input_files("#file-input", str(indexed_png))
    expect(page.locator("#query-panel .ori")).to_have_count(0)
    expect(page.locator("#query-info")).to_contain_text("PNG")
    for frame in page.locator("#neighbors .thumb").all():
        assert frame.locator(".ori").all_inner_texts() == ["A", "P", "R", "L"]


def test_one_result_per_patient_is_the_default(page, live_server, indexed_png):
    open_app(page, live_server)
    expect(page.locator("#group-patient")).to_be_checked()
    with search_response(page, group="patient") as response:
        page.set_input_files("#file-input", str(indexed_png))
    assert response.value.ok
    patients = page.locator("#neighbors .neighbor-card .patient").all_inner_texts()
    assert len(patients) == len(set(patients)) > 1
    # Unchecked: the plain nearest slices, several of one patient.
    with page.expect_response(lambda r: "/search?" in r.url and "group=slice" in r.url) as plain:
        page.uncheck("#group-patient")
    assert plain.value.ok
    expect(cards(page)).to_have_count(int(page.input_value("#k")))
    patients = page.locator("#neighbors .neighbor-card .patient").all_inner_texts()
    assert len(set(patients)) < len(patients)


def test_the_archive_and_the_example(page, live_server, retrieval):
    open_app(page, live_server)
    expect(page.locator("#try-example")).to_be_visible()
    with page.expect_response(lambda r: "/similar?" in r.url) as response:
        page.click("#try-example")
    assert response.value.ok and "group=patient" in response.value.url
    example = response.value.json()
    # the slice the server names (/info): the lesion slice whose first page matches best
    assert example["slice_id"] == retrieval.example()["slice_id"]
    expect(cards(page)).to_have_count(len(example["neighbors"]))
    shown = page.locator("#neighbors .neighbor-card .patient").all_inner_texts()
    own = page.locator("#archive-patient").input_value()
    row = list(retrieval.slice_ids).index(example["slice_id"])
    assert retrieval.patient_by_external[own] == retrieval.slice_patient[row]
    assert own not in shown and len(shown) == len(set(shown)) == len(example["neighbors"])
    expect(page.locator("#search-title")).to_contain_text(f"patient {own}")

    # Browse: another patient, a slice on the slider, its thumbnail, then search with it.
    # Another patient than the example's, so that its caption shows only once it has loaded
    # (the slider set before that would be reset to the middle slice).
    other = [p for p in sorted(retrieval.patient_by_external) if p != own][-1]
    page.select_option("#archive-patient", other)
    slider = page.locator("#archive-slider")
    expect(page.locator("#archive-caption")).to_contain_text(other)
    slider.fill("3")
    thumb = page.locator("#archive-thumb")
    pid = retrieval.patient_by_external[other]
    rows = [r for r in range(len(retrieval.slice_ids)) if retrieval.slice_patient[r] == pid]
    rows.sort(key=lambda r: retrieval.slice_index[r])
    expect(thumb).to_have_attribute("data-slice-id", str(int(retrieval.slice_ids[rows[3]])))
    page.wait_for_function("() => { const i = document.querySelector('#archive-thumb');"
                           " return i.complete && i.naturalWidth === 256; }")
    with page.expect_response(
            lambda r: f"/slices/{int(retrieval.slice_ids[rows[3]])}/similar?" in r.url) as hit:
        page.click("#archive-search")
    assert hit.value.ok
    expect(page.locator("#file-name")).to_contain_text(f"patient {other}, slice "
                                                       f"{int(retrieval.slice_index[rows[3]])}")


def test_compose_offers_the_search_filters(page, live_server, indexed_png, other_png,
                                          indexed_slices):
    open_app(page, live_server)
    page.click("#mode-compose")
    page.fill("#compose-k", "3")
    page.fill("#compose-exclude-patient", indexed_slices[1].patient_id)
    page.select_option("#compose-has-abnormality", "true")
    page.set_input_files("#compose-normal-input", str(indexed_png))
    with page.expect_response(lambda r: "/compose?" in r.url) as response:
        page.set_input_files("#compose-abnormal-input", str(other_png))
    assert response.value.ok, response.value.text()
    url = response.value.url
    assert "group=patient" in url and "has_abnormality=true" in url
    assert f"exclude_patient={indexed_slices[1].patient_id}" in url
    body = response.value.json()
    patients = page.locator("#compose-neighbors .neighbor-card .patient").all_inner_texts()
    assert indexed_slices[1].patient_id not in patients and len(set(patients)) == len(patients)
    panel = page.locator("#compose-panel figure:has(img[data-role=segmentation])")
    if sum(body["composite_pixels"].values()):
        expect(panel.locator(".lesion-legend")).to_contain_text("TC")
    else:
        expect(panel.locator(".no-lesion")).to_have_text("No lesion predicted")


@pytest.mark.parametrize("width", [420, 1440])
def test_layout_from_narrow_to_wide(browser, live_server, indexed_png, width, errors):
    """Geometry, not pixels: nothing wider than the window, a header that leaves the results
    readable while scrolling, images side by side. Screenshots go to $CBIR_SCREENSHOTS."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", errors.on_console)
    page.on("pageerror", errors.on_page_error)
    try:
        open_app(page, live_server)
        header = page.locator(".sticky-top").bounding_box()
        assert header["height"] <= (160 if width < 700 else 110), header
        upload_and_wait(page, indexed_png, k=4)
        wait_first_image(page)
        page.check("#toggle-overlays")
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        # Scrolled to the neighbours, the first card is what is under its own centre.
        first = cards(page).first
        first.scroll_into_view_if_needed()
        page.evaluate("window.scrollBy(0, -10)")
        box = first.bounding_box()
        under = page.evaluate(
            "([x, y]) => document.elementFromPoint(x, y)?.closest('.neighbor-card')?.dataset.rank",
            [box["x"] + box["width"] / 2, box["y"] + min(box["height"], 200) / 2])
        assert under == "1"
        figures = page.locator("#query-panel figure").all()
        tops = sorted({round(f.bounding_box()["y"]) for f in figures})
        assert len(tops) == (2 if width < 700 else 1), tops  # 2 x 2 narrow, 1 x 4 wide
        for f in figures:
            assert f.bounding_box()["width"] >= (150 if width < 700 else 200)
        out = os.environ.get("CBIR_SCREENSHOTS")
        if out:
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(Path(out) / f"page-{width}.png"), full_page=True)
    finally:
        context.close()


def test_a_far_query_shows_its_warning(page, live_server, indexed_png, monkeypatch):
    """The server's `warnings` reach the reader (the server runs in this process: every query
    is made 'far')."""
    from indexer.reference import Reference

    monkeypatch.setattr(Reference, "far", lambda self, space, distance, lesion=None: 99.0)
    monkeypatch.setattr(Reference, "match_percentile",
                        lambda self, space, distance, lesion=None: 0.0)
    open_app(page, live_server)
    body = upload_and_wait(page, indexed_png, k=2)
    assert body["warnings"]
    box = page.locator("#search-warnings")
    expect(box).to_be_visible()
    expect(box).to_contain_text("Nothing in this archive resembles this image closely")


def test_page_and_api_docs_request_nothing_outside_the_server(page, live_server):
    """Offline: the page, Swagger UI and ReDoc load every asset from this server, and the browser
    logs no failed request (the page fixture fails on any console error)."""
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    open_app(page, live_server)
    page.goto(live_server + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("compositional-cbir")
    page.goto(live_server + "/redoc")
    expect(page.locator("h1").first).to_contain_text("compositional-cbir")
    expect(page.locator("[role=menu]").first).to_be_visible()
    page.wait_for_load_state("networkidle")
    outside = [u for u in requested
               if not u.startswith((live_server, "data:", "blob:", "about:"))]
    assert not outside, outside
    assert any(u.endswith("/openapi.json") for u in requested)


def test_compose_example_and_archive_picker(page, live_server, retrieval):
    """A newcomer composes without files: the example takes the archive's lesion slice and a
    lesion-free slice of another patient at the nearest level; the picker sets either side."""
    open_app(page, live_server)
    page.click("#mode-compose")
    patients = sorted(retrieval.patient_by_external)
    expect(page.locator("#compose-exclude-patient")).to_have_attribute(
        "placeholder", f"e.g. {patients[0]}")
    with page.expect_response(lambda r: "/compose?" in r.url) as response:
        page.click("#compose-example")
    assert response.value.ok, response.value.text()
    body = response.value.json()
    expect(page.locator("#composite")).to_be_visible()
    names = [page.inner_text(f"#compose-{w}-name") for w in ("normal", "abnormal")]
    anatomy, lesion = (n.split(" slice ")[0] for n in names)
    assert anatomy != lesion and {anatomy, lesion} <= set(patients)
    assert body["abnormal_query"]["kind"] == "png"
    # No markers on PNG uploads (the archive slices travel as their stored PNGs).
    assert page.locator("#compose-panel .ori").count() == 0

    # The picker: another slice of the archive as the lesion, the anatomy kept.
    picker = page.locator("#compose-archive")
    expect(picker).to_have_attribute("open", "")
    other = [p for p in patients if p not in (anatomy, lesion)][0]
    page.select_option("#compose-archive-patient", other)
    expect(page.locator("#compose-archive-caption")).to_contain_text(other)
    with page.expect_response(lambda r: "/compose?" in r.url) as response:
        page.click("#compose-archive-lesion")
    assert response.value.ok, response.value.text()
    expect(page.locator("#compose-abnormal-name")).to_contain_text(other)
    expect(page.locator("#compose-normal-name")).to_contain_text(anatomy)
