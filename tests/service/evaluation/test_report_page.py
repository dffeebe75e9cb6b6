"""The HTML report in a real browser (Debian's headless Chromium, driven by Playwright, as
tests/service/test_web.py): every plot and example image decodes, every section is there, and
the page asks for nothing outside itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.evaluation.figures import SPACE_FIGURES

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"

if not Path(CHROMIUM).exists():
    # CI (.ci/run) installs Chromium and sets CBIR_REQUIRE_BROWSER=1: there, absence fails.
    if os.environ.get("CBIR_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"CBIR_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
    pytestmark = pytest.mark.skip(reason=f"needs {CHROMIUM} (Debian package chromium)")


def test_report_opens_in_chromium_self_contained(report_dir, evaluation):
    url = (report_dir / "index.html").resolve().as_uri()
    errors, requested = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url)
            page.wait_for_load_state("load")
            assert page.title().startswith("cbir eval: tiny ")
            assert page.inner_text("h1") == "Retrieval evaluation"
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            assert len(images) >= 4 + len(evaluation.examples)
            for complete, width, alt in images:
                assert complete and width > 100, alt
            for space in SPACE_FIGURES:
                assert page.locator(f"#space-{space} table[data-space={space}]").count() == 1
                rows = page.locator(f"table[data-space={space}] tr").count()
                assert rows > len(SPACE_FIGURES[space]), space
            # The headline figure's cell shows the value JSON holds, as the page rounds it.
            fig = evaluation.result["figures"]["normal"]["normal_dice"]["at_k"]["1"]["model"]
            cell = page.locator("table[data-space=normal] tr.model td").nth(2).inner_text()
            assert cell.startswith(f"{fig['value']:.3f}")
        finally:
            browser.close()
    assert not errors, errors
    outside = [u for u in requested if not u.startswith(("file:", "data:"))]
    assert not outside, outside
