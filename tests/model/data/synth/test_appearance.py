"""The renderer: label maps to post-contrast T1 images with random appearance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from model.data.synth import appearance as A
from model.data.synth import tissue as T


def _map(shape=(96, 96)) -> torch.Tensor:
    """Background ring, then white matter, a grey-matter band, CSF, and a bright vessel."""
    t = np.zeros(shape, np.int64)
    t[8:-8, 8:-8] = T.WM
    t[8:20, 8:-8] = T.GM
    t[40:56, 40:56] = T.CSF
    t[70:74, 20:60] = T.VESSEL
    return torch.from_numpy(t)


def _plain(rng_seed: int = 0) -> A.Appearance:
    """An appearance without blur, noise, bias or texture, so class means show as they are."""
    look = A.sample_appearance(np.random.default_rng(rng_seed), 2)
    return dataclasses.replace(look, spread=(0.0,) * T.NUM_TISSUES, texture=0.0, bias=0.0,
                               noise=0.0, blur=(0.0, 0.0), resolution=(1.0, 1.0), gamma=1.0,
                               scale_jitter=1.0)


def test_background_is_zero_and_brain_positive_in_unit_range():
    tissue = _map()
    for seed in range(5):
        look = A.sample_appearance(np.random.default_rng(seed), 2)
        x = A.render(tissue, look, torch.Generator().manual_seed(seed))
        assert (x[tissue == 0] == 0).all()
        assert (x[tissue > 0] > 0).all()
        assert float(x.max()) <= 1.0


def test_class_means_keep_the_t1_gd_order():
    tissue = _map()
    for seed in range(10):
        look = _plain(seed)
        x = A.render(tissue, look, torch.Generator().manual_seed(0))
        level = {c: float(x[tissue == c].median()) for c in (T.WM, T.GM, T.CSF, T.VESSEL)}
        assert level[T.VESSEL] >= level[T.WM] > level[T.GM] > level[T.CSF], (seed, level)
        # Without spread, noise or bias, a class is one value: its mean over the scale.
        np.testing.assert_allclose(level[T.GM] / level[T.WM], look.means[T.GM] / look.means[T.WM],
                                   rtol=1e-5)


def test_means_stay_inside_their_priors():
    for seed in range(50):
        m = A.sample_means(np.random.default_rng(seed))
        assert m[T.WM] == 1.0
        for cls, (lo, hi) in T.INTENSITY_PRIOR.items():
            assert lo <= m[cls] <= hi, (seed, cls, m[cls])
        assert m[T.GM] <= m[T.DEEP_GM] <= m[T.WM]


def test_same_seed_same_draws_so_two_maps_differ_only_near_their_difference():
    a = _map((128, 128))
    b = a.clone()
    b[60:66, 60:66] = T.ENHANCING
    look = A.sample_appearance(np.random.default_rng(3), 2)
    look = dataclasses.replace(look, resolution=(1.0, 1.0))
    raw_a = A.render_raw(a, look, torch.Generator().manual_seed(7))
    raw_b = A.render_raw(b, look, torch.Generator().manual_seed(7))
    scale = A.brain_scale(raw_b, b > 0)
    xa, xb = A.finish(raw_a, a > 0, look, scale), A.finish(raw_b, b > 0, look, scale)
    differs = (xa != xb).numpy()
    assert differs.any()
    changed = (a != b).numpy()
    reach = ndi.distance_transform_edt(~changed)[differs].max()
    assert reach <= 3 * max(look.blur) + 1.5, reach


def test_blur_is_scipys_gaussian_filter():
    x = torch.rand(40, 50, 30, generator=torch.Generator().manual_seed(0))
    sigmas = (0.8, 1.5, 0.0)
    ours = A.blur(x, sigmas).numpy()
    ref = ndi.gaussian_filter(x.numpy(), sigma=sigmas, mode="mirror", truncate=3.0)
    # scipy's radius is int(truncate * sigma + 0.5), ours ceil(3 sigma): compare away from edges
    np.testing.assert_allclose(ours[5:-5, 5:-5], ref[5:-5, 5:-5], atol=2e-3)


def test_render_batch_draws_an_appearance_per_slice_and_repeats_with_its_seeds():
    tissue = torch.stack([_map()] * 4)
    one = A.render_batch(tissue, torch.Generator().manual_seed(1), np.random.default_rng(1))
    two = A.render_batch(tissue, torch.Generator().manual_seed(1), np.random.default_rng(1))
    assert one.shape == (4, 1, 96, 96)
    torch.testing.assert_close(one, two)
    wm = [float(one[i, 0][tissue[i] == T.WM].median()) for i in range(4)]
    gm = [float(one[i, 0][tissue[i] == T.GM].median()) for i in range(4)]
    assert len({round(g / w, 3) for g, w in zip(gm, wm, strict=True)}) == 4


@pytest.mark.parametrize("shape", [(24, 20, 16)])
def test_volumes_render_too(shape):
    t = np.zeros(shape, np.int64)
    t[4:-4, 4:-4, 2:-2] = T.WM
    t[8:12, 8:12, 6:10] = T.ENHANCING
    look = A.sample_appearance(np.random.default_rng(0), 3, thick_axis=2)
    x = A.render(torch.from_numpy(t), look, torch.Generator().manual_seed(0))
    assert x.shape == shape and (x[torch.from_numpy(t) == 0] == 0).all()


@pytest.mark.parametrize("spacing,thickness,phase", [
    (1.0, 1.0, 0.0), (2.0, 2.0, 0.5), (5.5, 4.0, 3.1), (6.0, 6.0, 0.0), (6.0, 4.2, 5.99)])
def test_through_plane_weights_sum_to_one_and_span_the_two_slices_around_the_level(
        spacing, thickness, phase):
    cut = A.ThickSlice(spacing=spacing, thickness=thickness, phase=phase)
    w = A.through_plane_weights(cut)
    assert w.shape == (2 * A.SLAB_HALF + 1,) and (w >= 0).all()
    assert w.sum() == pytest.approx(1.0, abs=1e-9)
    levels = np.flatnonzero(w > 1e-12) - A.SLAB_HALF
    # Nothing beyond the two acquired slices' boxes: [phase - spacing - t/2, phase + t/2].
    assert levels.min() >= np.floor(phase - spacing - thickness / 2 + 0.5) - 1e-9
    assert levels.max() <= np.ceil(phase + thickness / 2 - 0.5) + 1e-9


def test_through_plane_weights_of_a_1mm_scan_are_the_level_itself():
    w = A.through_plane_weights(A.ThickSlice(spacing=1.0, thickness=1.0, phase=0.0))
    expected = np.zeros_like(w)
    expected[A.SLAB_HALF] = 1.0
    np.testing.assert_allclose(w, expected, atol=1e-12)


def test_a_thick_slice_shows_the_tissue_of_the_levels_around_it():
    """A bright square two levels above a slice without it: a 1 mm rendering does not show it, a
    thick-sliced one does, partly (partial volume), and the slice's own mask still holds."""
    half = A.SLAB_HALF
    slab = torch.stack([_map()] * (2 * half + 1))
    slab[half + 2, 40:56, 40:56] = T.ENHANCING  # replaces the CSF square above the level
    look = _plain()
    thin = A.render_thick(slab, A.ThickSlice(1.0, 1.0, 0.0), look,
                          torch.Generator().manual_seed(0))
    thick = A.render_thick(slab, A.ThickSlice(5.0, 5.0, 0.0), look,
                           torch.Generator().manual_seed(0))
    flat = A.render(slab[half], look, torch.Generator().manual_seed(0))
    torch.testing.assert_close(thin, flat)
    csf = slab[half] == T.CSF
    assert thick[csf].median() > 1.2 * thin[csf].median()
    assert thick[csf].median() < look.means[T.ENHANCING] * thin[slab[half] == T.WM].median()
    assert (thick[slab[half] == 0] == 0).all()


def test_render_batch_draws_thick_slices_with_their_probability_only():
    half = A.SLAB_HALF
    tissue = torch.stack([_map()] * 6)
    slabs = torch.stack([torch.stack([_map()] * (2 * half + 1))] * 6)
    slabs[:, half + 2, 40:56, 40:56] = T.ENHANCING

    def draw(**kw):
        return A.render_batch(tissue, torch.Generator().manual_seed(4), np.random.default_rng(4),
                              **kw)

    base = draw()
    torch.testing.assert_close(draw(slabs=slabs, thick=0.0), base)
    torch.testing.assert_close(draw(slabs=slabs, thick=1.0), draw(slabs=slabs, thick=1.0))
    # Every slice thick-sliced: the square above shows in the CSF of each (1 mm: it cannot).
    thick = draw(slabs=slabs, thick=1.0)
    csf = tissue[0] == T.CSF
    wm = tissue[0] == T.WM
    ratio = [float(x[0][csf].median() / x[0][wm].median()) for x in thick]
    ratio_thin = [float(x[0][csf].median() / x[0][wm].median()) for x in base]
    assert min(r - t for r, t in zip(ratio, ratio_thin, strict=True)) > -0.05
    assert np.mean(ratio) > np.mean(ratio_thin) + 0.05
