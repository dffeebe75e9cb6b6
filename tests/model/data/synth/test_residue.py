"""The stripping residue drawn on training slices (model/data/synth/residue.py)."""

from __future__ import annotations

import numpy as np
import torch

from model.data.synth import tissue as T
from model.data.synth.residue import WIDTH_PX, draw_residues, strip_residue


def _slice() -> torch.Tensor:
    tissue = torch.zeros(96, 96, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    tissue[(yy - 48) ** 2 + (xx - 48) ** 2 < 30**2] = T.WM
    tissue[(yy - 48) ** 2 + (xx - 20) ** 2 < 6**2] = T.ENHANCING  # a lesion at the edge
    return tissue


def test_the_band_replaces_background_along_the_edge_only():
    tissue = _slice()
    drawn = 0
    for seed in range(20):
        out = strip_residue(tissue, np.random.default_rng(seed))
        changed = out != tissue
        assert (tissue[changed] == T.BACKGROUND).all()  # never brain, never lesion
        assert set(out[changed].unique().tolist()) <= {T.DURA, T.SINUS}
        # within the widest band of the brain's edge: nothing farther than WIDTH_PX[1] out
        reach = int(WIDTH_PX[1])
        near = torch.nn.functional.max_pool2d((tissue > 0).float()[None, None], 2 * reach + 1,
                                              1, reach)[0, 0] > 0
        assert not (changed & ~near).any()
        drawn += int(changed.sum())
    assert drawn > 0


def test_the_band_covers_arcs_not_the_whole_edge():
    tissue = _slice()
    ring = (strip_residue(tissue, np.random.default_rng(1)) != tissue)
    # the 1-px ring just outside the brain: an arc of it, never all of it
    grown = torch.nn.functional.max_pool2d((tissue > 0).float()[None, None], 3, 1, 1)[0, 0] > 0
    edge = grown & (tissue == 0)
    share = float((ring & edge).sum() / edge.sum())
    assert 0 < share < 1


def test_a_slab_gets_the_same_arcs_as_its_slice_and_zero_probability_draws_nothing():
    tissue = torch.stack([_slice(), _slice()])
    slabs = tissue[:, None].repeat(1, 5, 1, 1)
    out, out_slabs = draw_residues(tissue, slabs, 1.0, np.random.default_rng(4))
    assert (out != tissue).any()
    for i in range(2):
        for level in range(5):
            assert torch.equal(out_slabs[i, level], out[i])
    same, same_slabs = draw_residues(tissue, slabs, 0.0, np.random.default_rng(4))
    assert torch.equal(same, tissue) and torch.equal(same_slabs, slabs)
    assert (tissue == _slice()).all()  # the input is not modified


def test_a_slice_without_brain_comes_back_unchanged():
    empty = torch.zeros(32, 32, dtype=torch.uint8)
    assert torch.equal(strip_residue(empty, np.random.default_rng(0)), empty)
