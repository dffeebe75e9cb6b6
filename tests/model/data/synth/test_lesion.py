"""Tumour shapes and enhancement patterns, drawn on hand-made tissue."""

from __future__ import annotations

import numpy as np
import pytest

from model.data.synth import lesion as L
from model.data.synth import tissue as T


@pytest.fixture(scope="module")
def grid():
    """Offsets (3, N) of a 90 mm cube around the centre, and white matter with a cortex shell."""
    axis = np.arange(-45, 46, 1.5, dtype=np.float32)
    d = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1)
    r = np.linalg.norm(d, axis=0)
    tissue = np.where(r < 40, T.WM, np.where(r < 44, T.GM, T.BACKGROUND)).astype(np.uint8)
    tissue[(np.abs(d[0]) < 6) & (np.abs(d[1]) < 6) & (np.abs(d[2]) < 6) & (r > 30)] = T.VENTRICLE
    wm = (tissue == T.WM).astype(np.float32)
    return d, tissue, wm


def _lesions(kind: str, count: int = 12) -> list[L.Lesion]:
    out, seed = [], 0
    while len(out) < count:
        rng = np.random.default_rng(seed)
        seed += 1
        les = L.sample_lesion(rng, np.zeros(3), float(rng.uniform(8, 20)))
        if les.kind == kind:
            out.append(les)
    return out


@pytest.mark.parametrize("kind", L.KINDS)
def test_each_kind_draws_its_own_pattern(grid, kind):
    d, tissue, wm = grid
    for les in _lesions(kind, 6):
        out = L.draw(les, d, tissue, wm)
        labels = set(np.unique(out[np.isin(out, T.LESION_TISSUES)]).tolist())
        if kind == "non-enhancing":
            assert T.ENHANCING not in labels and T.NON_ENHANCING in labels
        elif kind == "patchy":
            assert {T.ENHANCING, T.NON_ENHANCING} <= labels
        elif kind == "ring":
            assert {T.ENHANCING, T.NECROSIS} <= labels
            # The necrosis sits inside: nearer the centre than the rim, on average.
            r = np.linalg.norm(d, axis=0)
            assert r[out == T.NECROSIS].mean() < r[out == T.ENHANCING].mean()
        else:
            assert T.ENHANCING in labels


def test_labels_stay_in_brain_tissue_and_within_the_extent(grid):
    d, tissue, wm = grid
    r = np.linalg.norm(d, axis=0)
    for kind in L.KINDS:
        for les in _lesions(kind, 4):
            out = L.draw(les, d, tissue, wm)
            lesion = np.isin(out, T.LESION_TISSUES)
            assert not (lesion & ((tissue == T.BACKGROUND) | (tissue == T.VENTRICLE))).any()
            assert r[lesion].max() <= les.extent
            # The ball the mass effect counts on is covered (away from the ventricle box).
            ball = (r < les.inner_radius) & (tissue == T.WM)
            assert lesion[ball].all()


def test_edema_reaches_further_in_white_matter_than_in_cortex(grid):
    d, tissue, wm = grid
    les = next(x for x in _lesions("ring", 30) if x.edema > 8)
    near_cortex = L.Lesion(**{**les.__dict__, "centre": les.centre,
                              "offsets": les.offsets + np.array([36.0, 0, 0], np.float32)})
    out = L.draw(near_cortex, d, tissue, wm)
    edema = out == T.EDEMA
    assert edema.any()
    # Measured from the tumour's side: edema voxels in the cortex stay closer than in white matter.
    centre = np.array([36.0, 0, 0])[:, None]
    dist = np.linalg.norm(d - centre, axis=0)
    in_gm, in_wm = edema & (tissue == T.GM), edema & (tissue == T.WM)
    assert in_gm.any() and in_wm.any()
    assert dist[in_gm].max() < dist[in_wm].max()


def test_tissue_to_seg_table():
    assert T.seg_of(np.array([T.NECROSIS, T.NON_ENHANCING, T.EDEMA, T.ENHANCING, T.VESSEL,
                              T.WM])).tolist() == [1, 1, 2, 4, 0, 0]
