"""The page when the model predicts no lesion: the lesion panels say so in words.

The shared test checkpoint predicts some lesion on every slice, so this module serves an index
built with a copy of it whose segmentation head always answers background.
"""

from __future__ import annotations

import pytest
import torch

from indexer.build import Indexer
from model.checkpoint import read_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.network import DecompositionNet
from service.config import Settings
from tests.service import test_web
from tests.service.conftest import _serve
from tests.service.test_web import browser, errors, expect, open_app, page  # noqa: F401

pytestmark = getattr(test_web, "pytestmark", [])  # skipped where the page tests are


@pytest.fixture(scope="module")
def lesionless_server(synth_cohort, tiny_checkpoint, tmp_path_factory):
    payload = read_checkpoint(tiny_checkpoint)
    net = DecompositionNet(ModelConfig.from_dict(payload["config"]))
    net.load_state_dict(payload["model"])
    with torch.no_grad():  # background wins every pixel by a wide margin
        net.segmentation_decoder.out.bias[0] += 1e4
    root = tmp_path_factory.mktemp("lesionless")
    checkpoint = root / "lesionless.pt"
    save_checkpoint(checkpoint, net.eval(), payload["preset"])
    index = root / "index"
    Indexer(index).build([synth_cohort], checkpoint=checkpoint, progress=False, workers=0)
    url, server, thread = _serve(Settings(index_dir=index, checkpoint=checkpoint))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_search_says_no_lesion_predicted(page, lesionless_server, indexed_png):  # noqa: F811
    open_app(page, lesionless_server)
    with page.expect_response(lambda r: "/search?" in r.url) as response:
        page.set_input_files("#file-input", str(indexed_png))
    body = response.value.json()
    assert response.value.ok and sum(body["query"]["predicted_pixels"].values()) == 0
    panel = page.locator("#query-panel figure:has(img[data-role=segmentation])")
    expect(panel.locator(".no-lesion")).to_have_text("No lesion predicted")
    expect(panel.locator(".lesion-legend")).to_have_count(0)


def test_compose_says_no_lesion_predicted_over_the_composite(page, lesionless_server,  # noqa: F811
                                                             indexed_png, other_png):
    open_app(page, lesionless_server)
    page.click("#mode-compose")
    page.set_input_files("#compose-normal-input", str(indexed_png))
    with page.expect_response(lambda r: "/compose?" in r.url) as response:
        page.set_input_files("#compose-abnormal-input", str(other_png))
    assert response.value.ok, response.value.text()
    assert sum(response.value.json()["composite_pixels"].values()) == 0
    panel = page.locator("#compose-panel figure:has(img[data-role=segmentation])")
    expect(panel.locator(".no-lesion")).to_have_text("No lesion predicted")
