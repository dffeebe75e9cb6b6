"""The separable SSIM equals MONAI's 2-D convolution SSIM, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
from monai.losses import SSIMLoss
from monai.metrics.regression import compute_ssim_and_cs

from model.ssim import ssim_loss, ssim_map


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g)
    b = (0.6 * a + 0.4 * torch.rand(shape, generator=g)).clamp(0, 1)
    return a, b


@pytest.mark.parametrize("shape", [(3, 1, 128, 128), (2, 1, 256, 256), (1, 2, 40, 57)])
def test_map_equals_monai(shape):
    a, b = _pair(shape)
    ours = ssim_map(a, b)
    theirs, _ = compute_ssim_and_cs(a, b, spatial_dims=2, kernel_size=(11, 11),
                                    kernel_sigma=(1.5, 1.5), data_range=1.0)
    assert ours.shape == theirs.shape == (*shape[:2], shape[2] - 10, shape[3] - 10)
    assert torch.allclose(ours, theirs, atol=2e-5)


def test_loss_and_gradient_equal_monai():
    a, b = _pair((4, 1, 128, 128), seed=1)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    theirs = SSIMLoss(spatial_dims=2, data_range=1.0)(a1, b)
    ours = ssim_loss(a2, b)
    theirs.backward()
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert torch.allclose(a2.grad, a1.grad, atol=2e-6)
    assert a1.grad.abs().max() > 1e-6  # the comparison is not between two zero gradients


def test_identical_images_score_one_and_stay_fp32_under_autocast():
    a, _ = _pair((2, 1, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ssim_map(a.bfloat16(), a.bfloat16())
    assert value.dtype == torch.float32
    assert torch.allclose(value, torch.ones_like(value), atol=1e-4)


def test_too_small_or_mismatched_images_are_named():
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim_map(torch.rand(1, 1, 8, 30), torch.rand(1, 1, 8, 30))
    with pytest.raises(ValueError, match="one shape"):
        ssim_map(torch.rand(1, 1, 30, 30), torch.rand(1, 1, 31, 30))
