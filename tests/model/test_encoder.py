"""The encoder against Table A.1."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS, preset
from model.encoder import Encoder

# Table A.1, the output shape of each row from 'Conv [5x5 32]' to the last 'AvgPool'.
TABLE_A1 = [
    (32, 256, 256),  # Conv 5x5 32
    (32, 128, 128),  # AvgPool
    (64, 128, 128),  # Res-block 64
    (64, 64, 64),  # AvgPool
    (128, 64, 64),  # Res-block 128
    (128, 32, 32),  # AvgPool
    (256, 32, 32),  # Res-block 256
    (256, 16, 16),  # AvgPool
    (512, 16, 16),  # Res-block 512
    (512, 8, 8),  # AvgPool
]


def _row_shapes(encoder: Encoder, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    hooks = [
        row.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
        for row in encoder.body
    ]
    try:
        heads = encoder(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes + [tuple(h.shape[1:]) for h in heads]


def test_paper_encoder_follows_table_a1():
    torch.manual_seed(0)
    encoder = Encoder(preset("paper")).eval()
    with torch.no_grad():
        shapes = _row_shapes(encoder, torch.rand(1, 1, 256, 256))
    # ... then the split into z_e- and z_e+, 64 x 8 x 8 each.
    assert shapes == TABLE_A1 + [(64, 8, 8), (64, 8, 8)]
    print(f"\nencoder parameters, paper: {sum(p.numel() for p in encoder.parameters()):,}")


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "paper"])
def test_every_preset_gives_the_same_code_shape(name):
    torch.manual_seed(0)
    config = preset(name)
    encoder = Encoder(config)
    side = config.model_size  # the network's own resolution (DecompositionNet resizes to it)
    normal, abnormal = encoder(torch.rand(2, 1, side, side))
    assert normal.shape == abnormal.shape == (2, 64, 8, 8)
    assert encoder.trunk(torch.rand(1, 1, side, side)).shape == (1, config.encoder_widths[-1], 8, 8)
    assert not torch.equal(normal, abnormal), "the two heads must be separate convolutions"


@pytest.mark.parametrize("shape", [(1, 256, 256), (1, 3, 256, 256), (2, 1, 128, 128)])
def test_encoder_rejects_other_inputs_by_shape(shape):
    with pytest.raises(ValueError, match=r"\(B, 1, 256, 256\)"):
        Encoder(preset("tiny"))(torch.rand(*shape))


def test_abnormal_gate_starts_open_and_scales_the_whole_code_of_a_slice():
    import dataclasses

    torch.manual_seed(0)
    plain = Encoder(preset("tiny")).eval()
    gated = Encoder(dataclasses.replace(preset("tiny"), abnormal_gate=True)).eval()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"abnormal_gate.weight", "abnormal_gate.bias"} and not unexpected
    x = torch.rand(3, 1, 256, 256)
    with torch.no_grad():
        normal, abnormal = plain(x)
        g_normal, g_abnormal = gated(x)
        assert torch.equal(g_normal, normal)  # the normal code does not pass the gate
        open_gate = torch.sigmoid(torch.tensor(6.0))
        assert torch.allclose(g_abnormal, abnormal * open_gate, atol=1e-6)
        # Each slice gets one gate from its own pooled features: closing it for slice 1 only
        # zeroes slice 1's code at every position.
        trunk = gated.trunk(x)
        pooled = torch.cat([trunk.amax((2, 3)), trunk.mean((2, 3))], 1)
        unit = (pooled[1] - pooled[0]) / (pooled[1] - pooled[0]).norm()
        gated.abnormal_gate.weight[0] = -1e4 * unit  # logit: -1e4 x (side of the midpoint)
        gated.abnormal_gate.bias.fill_(float(1e4 * unit @ (pooled[0] + pooled[1]) / 2))
        _, closed = gated(x)
        assert closed[1].abs().max() < 1e-6 * abnormal[1].abs().max() + 1e-6
        assert torch.allclose(closed[0], abnormal[0], atol=1e-6)
        # split() hands training the logit that made those gates, one per slice.
        _, split_abnormal, logit, positions = gated.split(trunk)
        assert torch.equal(split_abnormal, closed)
        assert logit.shape == (3,) and logit[1] < -10 < 10 < logit[0]
        assert positions is None  # the pooled gate has no per-position logits
        assert plain.split(plain.trunk(x))[2:] == (None, None)


def test_gate_by_position_opens_on_a_lesion_in_any_one_cell():
    """The slice's gate is the maximum of its positions' logits: one position that sees lesion
    opens the code of the whole slice. The detector max-pools, so a spot of 2 x 2 pixels reaches
    the 8 x 8 grid at full contrast (four average pools would leave 1/64 of it)."""
    import dataclasses

    from model.network import DecompositionNet

    config = dataclasses.replace(preset("tiny"), abnormal_gate=True, gate_by_position=True)
    gated = DecompositionNet(config).eval().encoder
    assert gated.abnormal_gate is None and gated.position_gate is not None
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        _, _, logit, positions = gated.split(gated.trunk(x), x)
        assert positions.shape == (2, 8, 8) and logit.shape == (2,)
        # By hand: every conv passes channel 0 through its centre tap, the head maps a
        # brightness b to 40 b - 20.
        for conv in [m for m in gated.position_gate.modules() if isinstance(m, torch.nn.Conv2d)]:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
        gated.position_gate.head.weight[0, 0, 1, 1] = 40.0
        gated.position_gate.head.bias.fill_(-20.0)
        x = 0.25 * torch.rand(2, 1, 256, 256, generator=torch.Generator().manual_seed(0))
        x[0, 0, 170:172, 75:77] = 1.0  # cell (170 // 32, 75 // 32) = (5, 2)
        trunk = gated.trunk(x)
        _, abnormal, logit, positions = gated.split(trunk, x)
        assert positions[0, 5, 2] == pytest.approx(20.0)
        assert positions[0].flatten().sort().values[-2] <= -10 and positions[1].max() <= -10
        assert logit[0] == positions[0, 5, 2] and logit[1] == positions[1].max()
        ungated = gated.abnormal_head(trunk).flatten(1).norm(dim=1)
        scale = abnormal.flatten(1).norm(dim=1) / ungated
        assert scale[0] > 0.999 and scale[1] < 1e-4  # slice 0 kept at every position
        with pytest.raises(ValueError, match="pass x"):
            gated.split(trunk)


def test_gate_by_position_learns_from_its_own_logits_only():
    """The code's losses do not reach the detector; its cross-entropy on the logits does."""
    import dataclasses

    torch.manual_seed(0)
    gated = Encoder(dataclasses.replace(preset("tiny"), abnormal_gate=True,
                                        gate_by_position=True))
    x = torch.rand(2, 1, 256, 256)
    _, abnormal, logit, positions = gated.split(gated.trunk(x), x)
    abnormal.pow(2).sum().backward(retain_graph=True)
    detector = list(gated.position_gate.parameters())
    assert all(p.grad is None for p in detector)
    assert gated.abnormal_head.weight.grad.abs().sum() > 0
    (logit.sum() + positions.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in detector)


def test_gate_by_position_needs_the_gate():
    import dataclasses

    with pytest.raises(ValueError, match="gate_by_position needs abnormal_gate"):
        dataclasses.replace(preset("tiny"), gate_by_position=True)
