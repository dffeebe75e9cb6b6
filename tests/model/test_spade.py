"""SPADE's null-condition shortcut equals SPADE on an explicit all-zero label map."""

from __future__ import annotations

import copy

import pytest
import torch

from model.config import preset
from model.network import DecompositionNet
from model.spade import SPADE


def _spade(seed=0) -> SPADE:
    torch.manual_seed(seed)
    layer = SPADE(channels=6, label_channels=4, hidden=5)
    for conv in (layer.shared[0], layer.gamma, layer.beta):  # nonzero, unlike the zero init
        torch.nn.init.normal_(conv.weight, std=0.5)
        torch.nn.init.normal_(conv.bias, std=0.5)
    with torch.no_grad():  # positive shared biases: the hidden map on zeros is not all zero
        layer.shared[0].bias.abs_()
    return layer


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (3, 3), (16, 16), (32, 20)])
def test_shortcut_equals_explicit_zeros_in_value_and_gradient(size):
    layer = _spade()
    x = torch.randn(3, 6, *size)
    zeros = torch.zeros(3, 4, *size)
    explicit = layer(x, zeros)
    explicit.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    shortcut = layer(x, None)
    shortcut.square().sum().backward()
    assert torch.allclose(shortcut, explicit, atol=1e-5)
    for ours, theirs in zip((p.grad for p in layer.parameters()), grads, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # The border really differs from the interior, so the test exercises the spreading.
    if min(size) >= 3:
        gamma = layer.gamma(layer.shared(zeros))
        assert not torch.allclose(gamma[..., 0, 1], gamma[..., 1, 1], atol=1e-3)


def test_pseudo_normal_of_the_whole_network_is_unchanged_by_the_shortcut():
    torch.manual_seed(0)
    net = DecompositionNet(preset("tiny")).train()
    for module in net.image_decoder.modules():  # undo the zero init of gamma / beta
        if isinstance(module, SPADE):
            torch.nn.init.normal_(module.gamma.weight, std=0.05)
            torch.nn.init.normal_(module.beta.weight, std=0.05)
    twin = copy.deepcopy(net)  # a training pass moves the codebooks: start both from one state
    x = torch.rand(2, 1, 256, 256)
    torch.manual_seed(1)
    fast = net(x, null_shortcut=True).pseudo_normal
    torch.manual_seed(1)
    plain = twin(x, null_shortcut=False).pseudo_normal
    assert torch.allclose(fast, plain, atol=1e-4)
    assert fast.std() > 0
