"""The assembled network: its encode / decode API, the SPADE condition, config and checkpoints."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from model.config import PRESETS, ModelConfig, preset
from model.network import DecompositionNet
from model.spade import SPADE


def _tiny(seed: int = 0) -> DecompositionNet:
    torch.manual_seed(seed)
    return DecompositionNet(preset("tiny"))


def _slices(batch: int = 2, seed: int = 100) -> torch.Tensor:
    return torch.rand(batch, 1, 256, 256, generator=torch.Generator().manual_seed(seed))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_per_preset():
    counts = {}
    for name in PRESETS:
        net = DecompositionNet(preset(name))
        counts[name] = _count(net)
        print(
            f"\n{name:>5}: total {counts[name]:>10,} | encoder {_count(net.encoder):>10,} | "
            f"segmentation decoder {_count(net.segmentation_decoder):>10,} | "
            f"image decoder {_count(net.image_decoder):>10,} | "
            f"codebooks 2 x {tuple(net.normal_quantizer.codebook.shape)} (buffers)",
            end="",
        )
    print()
    assert counts["paper"] > counts["small"] > counts["tiny"]
    # A quarter of the widths: about a sixteenth of the weights.
    assert 10 < counts["paper"] / counts["small"] < 20


def test_presets_share_the_latent_layout():
    for name in PRESETS:
        config = preset(name)
        assert (config.code_dim, config.code_size, config.codebook_size) == (64, 8, 512)
        assert config.num_classes == 4
    paper, small = preset("paper"), preset("small")
    assert [w // 4 for w in paper.encoder_widths] == list(small.encoder_widths)
    assert [w // 4 for w in paper.decoder_widths] == list(small.decoder_widths)
    assert paper.encoder_widths == (32, 64, 128, 256, 512)  # Table A.1
    assert paper.decoder_widths == (512, 256, 128, 64, 32, 16)  # Table A.2
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")


def test_config_round_trips_through_json_and_rejects_bad_values():
    config = preset("small")
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown ModelConfig fields: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": "blue"})
    with pytest.raises(ValueError, match="one entry more"):
        ModelConfig(decoder_widths=(512, 256))
    with pytest.raises(ValueError, match="ema_decay"):
        ModelConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(model_size=200)
    with pytest.raises(ValueError, match="must divide image_size"):
        ModelConfig(model_size=96, encoder_widths=(8, 8), decoder_widths=(8, 8, 8))


def test_forward_returns_what_training_needs():
    net = _tiny().train()
    out = net(_slices())
    for z in (out.normal_pre, out.abnormal_pre, out.normal.quantized, out.abnormal.quantized):
        assert z.shape == (2, 64, 8, 8)
    assert out.normal.indices.shape == out.abnormal.indices.shape == (2, 8, 8)
    assert out.abnormal.distance.shape == (2, 8, 8)
    assert out.logits.shape == (2, 4, 256, 256)
    assert out.reconstruction.shape == out.pseudo_normal.shape == (2, 1, 256, 256)
    assert out.normal.commitment.dim() == 0 and out.abnormal.commitment.dim() == 0


def test_encode_gives_codes_and_indices_that_agree():
    net = _tiny().eval()
    with torch.no_grad():
        codes = net.encode(_slices())
    assert codes.normal.shape == codes.abnormal.shape == (2, 64, 8, 8)
    assert codes.normal_indices.dtype == codes.abnormal_indices.dtype == torch.int64
    assert torch.equal(net.normal_quantizer.lookup(codes.normal_indices), codes.normal)
    assert torch.equal(net.abnormal_quantizer.lookup(codes.abnormal_indices), codes.abnormal)
    assert not torch.equal(net.normal_quantizer.codebook, net.abnormal_quantizer.codebook)


def test_condition_detaches_logits_and_zeroes_background_positions():
    logits = torch.zeros(1, 4, 2, 2, requires_grad=True)
    with torch.no_grad():
        logits[0, :, 0, 0] = torch.tensor([5.0, 1.0, 2.0, 3.0])  # background wins
        logits[0, :, 0, 1] = torch.tensor([1.0, 4.0, 2.0, -1.0])  # TC wins
        logits[0, :, 1, 0] = torch.tensor([-2.0, 0.0, 0.5, 3.0])  # ET wins
        logits[0, :, 1, 1] = torch.tensor([2.0, 1.0, 1.0, 1.0])  # background wins
    condition = DecompositionNet.condition(logits)
    assert not condition.requires_grad
    assert condition[0, :, 0, 0].eq(0).all() and condition[0, :, 1, 1].eq(0).all()
    assert torch.equal(condition[0, :, 0, 1], logits[0, :, 0, 1].detach())
    assert torch.equal(condition[0, :, 1, 0], logits[0, :, 1, 0].detach())


def test_untrained_spade_does_not_modulate():
    """Zero-initialised gamma and beta: at init the condition changes nothing, x_hat+ == x_hat-."""
    net = _tiny().eval()
    x = _slices()
    with torch.no_grad():
        assert torch.equal(net.reconstruct(x), net.pseudo_normal(x))
    spades = [m for m in net.image_decoder.modules() if isinstance(m, SPADE)]
    assert len(spades) == 15
    assert all(m.gamma.weight.eq(0).all() and m.beta.bias.eq(0).all() for m in spades)


def _with_modulation(net):
    """Give every SPADE layer non-zero gamma and beta, as training would."""
    torch.manual_seed(1)
    for m in net.image_decoder.modules():
        if isinstance(m, SPADE):
            for conv in (m.gamma, m.beta):
                nn.init.normal_(conv.weight, std=0.1)
    return net


def test_pseudo_normal_is_decode_with_an_all_zero_condition():
    net = _with_modulation(_tiny()).eval()
    x = _slices()
    with torch.no_grad():
        codes = net.encode(x)
        expected = net.image_decoder(codes.normal, torch.zeros(2, 4, 256, 256))
        assert torch.equal(net.pseudo_normal(x), expected)
        assert torch.equal(net.decode(codes.normal, None), expected)
        assert not torch.equal(net.reconstruct(x), expected)


def test_decode_indices_of_a_slices_own_codes_is_its_reconstruction():
    net = _tiny().eval()
    x = _slices()
    with torch.no_grad():
        codes = net.encode(x)
        drawn = net.decode_indices(codes.normal_indices, codes.abnormal_indices)
        assert torch.equal(drawn, net.reconstruct(x))


def test_decode_indices_composes_one_slices_anatomy_with_anothers_lesion():
    net = _tiny().eval()
    with torch.no_grad():
        a, b = net.encode(_slices(1, seed=1)), net.encode(_slices(1, seed=2))
        composed = net.decode_indices(a.normal_indices, b.abnormal_indices)
        expected = net.decode(a.normal, net.condition(net.segment(b.abnormal)))
        assert torch.equal(composed, expected)
        assert composed.shape == (1, 1, 256, 256)


def test_no_predicted_lesion_means_reconstruction_equals_pseudo_normal():
    net = _tiny().eval()
    with torch.no_grad():
        net.segmentation_decoder.out.bias[0] = 1e4  # background wins everywhere
        x = _slices()
        assert torch.equal(net.reconstruct(x), net.pseudo_normal(x))


def test_image_losses_do_not_reach_the_segmentation_path():
    net = _tiny().train()
    out = net(_slices())
    (out.reconstruction.square().mean() + out.pseudo_normal.square().mean()).backward()
    assert all(p.grad is None for p in net.segmentation_decoder.parameters())
    assert all(p.grad is None for p in net.encoder.abnormal_head.parameters())
    assert net.encoder.normal_head.weight.grad.abs().sum() > 0
    assert any(p.grad.abs().sum() > 0 for p in net.image_decoder.parameters())


def test_convolutions_get_he_init():
    torch.manual_seed(0)
    net = DecompositionNet(preset("paper"))
    conv = net.encoder.body[8].conv2  # Table A.1, Res-block 512: 512 x 3 x 3 fan-in
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.02)
    assert net.encoder.normal_head.bias.eq(0).all()


def test_state_dict_round_trip_gives_bit_identical_outputs():
    net = _tiny(seed=0).train()
    for seed in range(3):  # move BatchNorm statistics and the EMA codebooks off their init
        net(_slices(seed=seed))
    net.eval()
    buffer = io.BytesIO()
    torch.save({"config": net.config.to_dict(), "state": net.state_dict()}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    loaded = DecompositionNet(ModelConfig.from_dict(saved["config"])).eval()
    x = _slices(seed=7)
    with torch.no_grad():
        assert not torch.equal(loaded(x).reconstruction, net(x).reconstruction)
        loaded.load_state_dict(saved["state"])
        mine, theirs = net(x), loaded(x)
    for field in ("reconstruction", "pseudo_normal", "logits", "normal_pre", "abnormal_pre"):
        assert torch.equal(getattr(mine, field), getattr(theirs, field)), field
    assert torch.equal(mine.normal.indices, theirs.normal.indices)
    assert torch.equal(mine.abnormal.indices, theirs.abnormal.indices)


def test_cpu_preset_reads_and_draws_256_through_a_128_network():
    torch.manual_seed(0)
    net = DecompositionNet(preset("cpu")).eval()
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        drawn = net.draw(x)
        out = net.train()(x)
    assert drawn.codes.normal.shape == drawn.codes.abnormal.shape == (2, 64, 8, 8)
    assert net.normal_quantizer.codebook.shape == (512, 64)
    assert drawn.reconstruction.shape == drawn.pseudo_normal.shape == (2, 1, 256, 256)
    assert drawn.logits.shape == (2, 4, 256, 256)
    assert out.reconstruction.shape == (2, 1, 128, 128) and out.logits.shape == (2, 4, 128, 128)
    # The one resizing on the way in is a 2 x 2 average.
    assert torch.allclose(net.to_model_size(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, C, 256, 256\)"):
        net.to_model_size(torch.rand(1, 1, 128, 128))


def test_channels_last_and_bf16_keep_the_outputs():
    """The two exact-in-intent speed-ups: channels_last is exact; bf16 autocast changes the
    loss only at bf16 precision, and the quantizers still run in fp32."""
    from model.losses import DecompositionLoss, LossWeights

    torch.manual_seed(0)
    net = DecompositionNet(preset("cpu")).eval()
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        plain = net.draw(x)
        fast = net.to(memory_format=torch.channels_last).draw(
            x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain.reconstruction, fast.reconstruction, atol=1e-5)
    assert torch.equal(plain.codes.normal_indices, fast.codes.normal_indices)

    target = torch.zeros(2, 256, 256, dtype=torch.long)
    target[0, 100:140, 100:150] = 2
    criterion = DecompositionLoss(LossWeights(rec=5.0))
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    loss32, _ = criterion(net(x), x, target)
    net.load_state_dict(state)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = net(x)
    loss16, _ = criterion(out16, x, target)
    assert out16.normal.quantized.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02 * abs(loss32.item())
