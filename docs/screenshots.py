"""Take the README's page screenshots against a running `cbir serve`.

    python docs/screenshots.py --url http://127.0.0.1:8000 --query QUERY.png --out docs

One search for QUERY (a slice with a lesion), one result per patient, label overlays on, at 1440
and 420 px wide; full-page PNGs named page-1440.png and page-420.png. Needs Debian's Chromium.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"


def shoot(url: str, query: Path, out: Path, k: int = 6, widths=(1440, 420)) -> list[Path]:
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        for width in widths:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(url + "/")
            expect(page.locator("body")).to_have_attribute("data-state", "ready")
            page.fill("#k", str(k))
            with page.expect_response(lambda r: "/search?" in r.url) as response:
                page.set_input_files("#file-input", str(query))
            if not response.value.ok:
                raise SystemExit(f"search failed: {response.value.text()}")
            expect(page.locator("#neighbors .neighbor-card")).to_have_count(k)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#neighbors .neighbor-image')]"
                ".every(i => i.complete && i.naturalWidth > 0)")
            page.check("#toggle-overlays")
            page.evaluate("window.scrollTo(0, 0)")
            path = out / f"page-{width}.png"
            page.screenshot(path=str(path), full_page=True)
            written.append(path)
            page.close()
        browser.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--query", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--k", type=int, default=6)
    args = parser.parse_args()
    for path in shoot(args.url, args.query, args.out, args.k):
        print(path)


if __name__ == "__main__":
    main()
