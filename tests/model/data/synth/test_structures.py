"""The normal tissue that enhances: where the fixed structures lie, and what a patient keeps."""

from __future__ import annotations

import numpy as np
import pytest

from model.data.synth import structures as S
from model.data.synth import tissue as T
from model.data.synth.template import load_template


@pytest.fixture(scope="module")
def tpl():
    return load_template()


@pytest.fixture(scope="module")
def fixed():
    return S.template_structures()


def _mni(tpl, mask):
    return np.argwhere(mask) - tpl.origin


def test_every_fixed_structure_is_drawn(fixed):
    assert set(np.unique(fixed).tolist()) == {0, *S.STRUCTURE_TISSUE}


def test_sinuses_and_falx_sit_on_the_midline_or_the_back(tpl, fixed):
    for sid in (S.SSS, S.STRAIGHT, S.FALX):
        x = _mni(tpl, fixed == sid)[:, 0]
        assert np.abs(x).max() <= 3.5, sid
    sss = _mni(tpl, fixed == S.SSS)
    assert sss[:, 2].max() > 60  # over the vertex
    assert (tpl.brain[fixed == S.SSS] == 0).mean() > 0.5  # mostly outside the brain
    transverse = _mni(tpl, fixed == S.TRANSVERSE)
    assert transverse[:, 1].max() < -50 and np.abs(transverse[:, 0]).max() > 30


def test_choroid_zone_lies_in_the_lateral_ventricles(tpl, fixed):
    zone = fixed == S.CHOROID_ZONE
    assert zone.sum() > 500
    assert np.isin(tpl.anatomy[zone], (5, 6)).all()


def test_overlay_keeps_connected_stretches_and_choroid_only_in_ventricles():
    n = 4000
    structures = np.repeat(np.array([0, *S.STRUCTURE_TISSUE]), n // 5).astype(np.uint8)
    tissue = np.full(structures.shape, T.WM, np.uint8)
    tissue[np.flatnonzero(structures == S.CHOROID_ZONE)[: n // 10]] = T.VENTRICLE
    coverage = np.sin(np.arange(structures.size) / 50.0)  # smooth: stretches, not specks
    shown = [S.overlay(tissue, structures, coverage, np.random.default_rng(s)) for s in range(40)]
    for out in shown:
        choroid = out == T.CHOROID
        assert (tissue[choroid] == T.VENTRICLE).all()
        assert (out[structures == 0] == tissue[structures == 0]).all()
    # Over 40 patients each structure is shown to some and not to others.
    for sid, cls in S.STRUCTURE_TISSUE.items():
        seen = [bool((out[structures == sid] == cls).any()) for out in shown]
        assert 0 < sum(seen) < len(seen), sid


def test_vessels_run_through_sulci_near_the_surface():
    tissue = np.full((40, 40, 40), T.WM, np.uint8)
    tissue[:, :, 30:] = T.CSF
    tissue[:, :, 25:30] = T.GM
    depth = np.broadcast_to(np.abs(np.arange(40) - 40.0), (40, 40, 40)).astype(np.float32)
    masks = [S.vessels(tissue, depth, np.random.default_rng(s)) for s in range(10)]
    assert any(m.any() for m in masks)
    for m in masks:
        assert np.isin(tissue[m], (T.CSF, T.GM)).all()
