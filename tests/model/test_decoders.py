"""The decoders against Table A.2, and the SPADE block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import preset
from model.decoders import ImageDecoder, SegmentationDecoder
from model.spade import SPADE

# Table A.2, the output shape of the conv-block and of each 'Upsample (SPADE-)Res-block' row.
TABLE_A2 = [
    (512, 8, 8),
    (256, 16, 16),
    (128, 32, 32),
    (64, 64, 64),
    (32, 128, 128),
    (16, 256, 256),
]


def _row_shapes(decoder, *args) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    rows = [decoder.conv_block, *decoder.blocks, decoder.out]
    hooks = [
        row.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
        for row in rows
    ]
    try:
        decoder(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def test_paper_segmentation_decoder_follows_table_a2():
    torch.manual_seed(0)
    decoder = SegmentationDecoder(preset("paper")).eval()
    with torch.no_grad():
        shapes = _row_shapes(decoder, torch.randn(1, 64, 8, 8))
    assert shapes == TABLE_A2 + [(4, 256, 256)]  # logits: background, TC, ED, ET
    print(f"\nsegmentation decoder parameters, paper: {_count(decoder):,}")


def test_paper_image_decoder_follows_table_a2():
    torch.manual_seed(0)
    decoder = ImageDecoder(preset("paper")).eval()
    with torch.no_grad():
        shapes = _row_shapes(decoder, torch.randn(1, 64, 8, 8), torch.randn(1, 4, 256, 256))
    assert shapes == TABLE_A2 + [(1, 256, 256)]
    print(f"\nimage decoder parameters, paper: {_count(decoder):,}")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_spade_sees_the_condition_at_its_own_size():
    torch.manual_seed(1)
    decoder = ImageDecoder(preset("tiny")).eval()
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, args: seen.append((tuple(args[0].shape[-2:]), tuple(args[1].shape[-2:])))
        )
        for m in decoder.modules()
        if isinstance(m, SPADE)
    ]
    with torch.no_grad():
        decoder(torch.randn(1, 64, 8, 8), torch.randn(1, 4, 256, 256))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 15  # three per upsampling row, five rows
    assert all(feature == label for feature, label in seen)
    assert sorted({f[0] for f, _ in seen}) == [16, 32, 64, 128, 256]


def test_the_condition_changes_the_image_and_nothing_conditions_the_segmentation():
    torch.manual_seed(2)
    config = preset("tiny")
    image, seg = ImageDecoder(config).eval(), SegmentationDecoder(config).eval()
    code = torch.randn(1, 64, 8, 8)
    lesion = torch.zeros(1, 4, 256, 256)
    lesion[:, 2, 100:140, 100:140] = 3.0
    with torch.no_grad():
        assert not torch.equal(image(code, lesion), image(code, torch.zeros_like(lesion)))
        assert seg(code).shape == (1, 4, 256, 256)


def test_spade_without_gamma_and_beta_is_parameter_free_batchnorm():
    torch.manual_seed(3)
    spade = SPADE(channels=6, label_channels=4, hidden=8).train()
    for head in (spade.gamma, spade.beta):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    x = 3 + 2 * torch.randn(2, 6, 16, 16)
    out = spade(x, torch.randn(2, 4, 16, 16))
    expected = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in spade.norm.parameters())


def test_spade_modulates_as_one_plus_gamma_and_beta():
    torch.manual_seed(4)
    spade = SPADE(channels=3, label_channels=2, hidden=5).eval()
    x, label = torch.randn(1, 3, 8, 8), torch.randn(1, 2, 8, 8)
    hidden = F.relu(spade.shared[0](label))
    expected = spade.norm(x) * (1 + spade.gamma(hidden)) + spade.beta(hidden)
    torch.testing.assert_close(spade(x, label), expected)


def test_spade_average_pools_the_label_map():
    """Single-pixel lesions: average pooling keeps them, nearest resizing would drop most."""
    torch.manual_seed(5)
    spade = SPADE(channels=3, label_channels=4, hidden=8).eval()
    x = torch.randn(1, 3, 16, 16)
    label = torch.zeros(1, 4, 256, 256)
    label[0, 3, 5::16, 7::16] = 1.0  # one lesion pixel in every 16 x 16 block, off the corner
    pooled = F.avg_pool2d(label, 16)
    assert torch.equal(spade(x, label), spade(x, pooled))
    assert not torch.equal(spade(x, label), spade(x, torch.zeros_like(pooled)))


def test_spade_is_local_a_lesion_leaves_far_pixels_alone():
    """Two 3x3 convs on the label map: a change reaches 2 pixels out, no further."""
    torch.manual_seed(6)
    spade = SPADE(channels=3, label_channels=4, hidden=8).eval()
    x = torch.randn(1, 3, 32, 32)
    empty = torch.zeros(1, 4, 32, 32)
    lesion = empty.clone()
    lesion[0, 1, 4:8, 4:8] = 5.0
    diff = (spade(x, lesion) - spade(x, empty)).abs().sum(1)[0]  # (32, 32)
    assert diff[2:10, 2:10].sum() > 0
    far = torch.ones_like(diff, dtype=torch.bool)
    far[: 8 + 2, : 8 + 2] = False
    assert diff[far].eq(0).all()


def test_decoders_reject_bad_codes_and_conditions():
    config = preset("tiny")
    with pytest.raises(ValueError, match=r"\(B, 64, H, W\)"):
        SegmentationDecoder(config)(torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 4, H, W\) condition"):
        ImageDecoder(config)(torch.randn(2, 64, 8, 8), torch.randn(2, 3, 256, 256))
    with pytest.raises(ValueError, match=r"\(2, 4, H, W\) condition"):
        ImageDecoder(config)(torch.randn(2, 64, 8, 8), torch.randn(1, 4, 256, 256))
