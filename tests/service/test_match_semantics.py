"""What MATCH says with the shipped checkpoint: the page's example reads as a good match in the
abnormal space, and an image that is not a brain slice reads low in every space (issue 22).

The other MATCH tests run on an untrained checkpoint, where only the arithmetic of the
percentile holds. Here the index is the session cohort encoded by ``checkpoints/cbir-cpu.pt``:
its example (``GET /info``, chosen when the generation is written) is searched as the page's
"Try an example" does (its own patient left out, one hit per patient), and noise and a
photograph-like gradient go up as PNGs.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from indexer.layout import SPACES

GOOD_MATCH = 50.0  # the floor for the example's first 5 hits
LOW = 10.0  # what a non-brain image may read at most


def test_the_example_reads_as_a_good_match(shipped_client):
    example = shipped_client.get("/info").json()["example"]
    assert example is not None
    others = [p for p in shipped_client.get("/patients").json()
              if p["patient_id"] != example["patient_id"]]
    r = shipped_client.post(f"/slices/{example['slice_id']}/similar?space=abnormal&k=5")
    assert r.status_code == 200, r.text
    hits = r.json()["neighbors"]
    assert len(hits) == min(5, len(others))
    assert example["patient_id"] not in {h["patient_id"] for h in hits}
    # as many lesion hits as the other patients can give (the cohort has a lesion-free one)
    with_lesion = sum(p["lesion_slices"] > 0 for p in others)
    assert sum(bool(h["has_abnormality"]) for h in hits) == min(len(hits), with_lesion), hits
    assert min(h["match_percentile"] for h in hits) >= GOOD_MATCH, [
        h["match_percentile"] for h in hits]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


NOT_A_BRAIN = {
    "noise": np.random.default_rng(0).integers(1, 255, (256, 256), dtype=np.uint8),
    "gradient": np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1)),
}


@pytest.mark.parametrize("name", sorted(NOT_A_BRAIN))
@pytest.mark.parametrize("space", SPACES)
def test_an_image_that_is_not_a_brain_slice_reads_low(shipped_client, name, space):
    r = shipped_client.post(f"/search?space={space}&k=5",
                            files={"file": (f"{name}.png", _png(NOT_A_BRAIN[name]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert max(h["match_percentile"] for h in body["neighbors"]) <= LOW, body["neighbors"]
    assert body["warnings"], "a non-brain image must carry a warning"
