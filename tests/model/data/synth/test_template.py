"""The anatomy labels derived from the MNI152 template."""

from __future__ import annotations

import numpy as np
import pytest

from model.data.synth.template import load_template


@pytest.fixture(scope="module")
def tpl():
    return load_template()


def test_template_loads_from_the_installed_package(tpl):
    assert tpl.t1.shape == (197, 233, 189)
    np.testing.assert_allclose(tpl.origin, [98, 134, 72])
    assert tpl.t1.min() >= 0 and tpl.t1.max() <= 1


def test_all_six_labels_with_plausible_volumes(tpl):
    ml = {k: int((tpl.anatomy == k).sum()) / 1000 for k in range(1, 7)}  # 1 mm voxels -> mL
    for k in (1, 2):
        assert 650 < ml[k] < 950, ml  # a cerebral hemisphere
    for k in (3, 4):
        assert 60 < ml[k] < 140, ml  # a cerebellar hemisphere
    for k in (5, 6):
        assert 4 < ml[k] < 25, ml  # a lateral ventricle


def test_labels_sit_on_their_side_and_level(tpl):
    x = np.arange(tpl.anatomy.shape[0]) - tpl.origin[0]
    z = np.arange(tpl.anatomy.shape[2]) - tpl.origin[2]
    for label, left in ((1, True), (2, False), (3, True), (4, False), (5, True), (6, False)):
        xs = np.nonzero(tpl.anatomy == label)[0]
        assert ((x[xs] < 0) == left).all(), label
    cereb_z = z[np.nonzero(tpl.anatomy == 3)[2]]
    vent_z = z[np.nonzero(tpl.anatomy == 5)[2]]
    assert np.median(cereb_z) < -20 < np.median(vent_z)
    # The labels mirror each other on the symmetric template.
    for a, b in ((1, 2), (3, 4), (5, 6)):
        ratio = (tpl.anatomy == a).sum() / (tpl.anatomy == b).sum()
        assert 0.95 < ratio < 1.05, (a, b, ratio)


def test_labels_only_inside_the_brain(tpl):
    assert not (tpl.anatomy[tpl.brain == 0] > 0).any()
