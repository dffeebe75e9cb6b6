"""Invariants of the EMA vector quantizer."""

from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.encoder import Encoder
from model.quantizer import VectorQuantizer


def _buffers(vq: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in vq.named_buffers()}


def test_indices_are_the_nearest_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(512, 64).eval()
    z = torch.randn(3, 64, 8, 8)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 64).double()
    brute = torch.cdist(flat, vq.codebook.double()) ** 2  # (N, K)
    chosen = brute.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    assert out.indices.shape == (3, 8, 8) and out.indices.dtype == torch.int64
    # Equal to the minimum up to fp32 rounding of the expanded distance, i.e. ties aside exact.
    torch.testing.assert_close(chosen, brute.min(1).values, rtol=1e-5, atol=1e-4)


def test_lookup_reproduces_the_quantized_tensor_exactly_in_eval():
    torch.manual_seed(1)
    vq = VectorQuantizer(512, 64).eval()
    z = torch.randn(2, 64, 8, 8, requires_grad=True)
    out = vq(z)
    assert out.quantized.shape == (2, 64, 8, 8)
    assert torch.equal(vq.lookup(out.indices), out.quantized)


def test_commitment_and_distance_follow_their_definitions():
    torch.manual_seed(2)
    vq = VectorQuantizer(32, 16).eval()
    z = torch.randn(2, 16, 4, 4)
    out = vq(z)
    codes = vq.lookup(out.indices)
    torch.testing.assert_close(out.distance, ((z - codes) ** 2).sum(1))
    torch.testing.assert_close(out.commitment, ((z - codes) ** 2).mean())
    assert out.distance.shape == (2, 4, 4)


def test_commitment_gradient_pulls_z_toward_its_code_only():
    torch.manual_seed(3)
    vq = VectorQuantizer(32, 16).eval()
    z = torch.randn(1, 16, 2, 2, requires_grad=True)
    out = vq(z)
    out.commitment.backward()
    expected = 2 * (z.detach() - vq.lookup(out.indices)) / z.numel()  # d mean((z - sg[e])^2)/dz
    torch.testing.assert_close(z.grad, expected)


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(4)
    config = preset("tiny")
    encoder = Encoder(config)
    vq = VectorQuantizer(config.codebook_size, config.code_dim)
    z, _ = encoder(torch.rand(2, 1, 256, 256))
    out = vq(z)
    (out.quantized**2).sum().backward()  # a loss on the quantized output only
    grads = [p.grad for p in encoder.body.parameters()] + [
        p.grad for p in encoder.normal_head.parameters()
    ]
    assert all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    # The other head did not feed this quantizer, so it got nothing.
    assert all(p.grad is None for p in encoder.abnormal_head.parameters())


def test_ema_changes_the_codebook_only_in_training_mode():
    torch.manual_seed(5)
    vq = VectorQuantizer(512, 64)
    z = torch.randn(4, 64, 8, 8)

    vq.eval()
    before = _buffers(vq)
    vq(z)
    vq(z)
    for name, buf in vq.named_buffers():
        assert torch.equal(buf, before[name]), f"eval forward changed {name}"

    vq.train()
    vq(z)
    for name, buf in vq.named_buffers():
        assert not torch.equal(buf, before[name]), f"training forward left {name} unchanged"


def test_ema_moves_a_code_to_the_mean_of_its_inputs():
    torch.manual_seed(6)
    vq = VectorQuantizer(8, 4, decay=0.9, dead_code_ratio=0.0).train()
    vq.initialized.fill_(True)  # a hand-set codebook: skip the data-dependent init
    with torch.no_grad():
        vq.codebook.mul_(10)  # spread the codes so the inputs below all pick code 0
        vq.codebook_sum.copy_(vq.codebook)
    z = vq.codebook[0].view(1, 4, 1, 1) + 0.5 * torch.randn(2, 4, 3, 3)
    for _ in range(300):
        out = vq(z)
    assert out.indices.eq(0).all()
    torch.testing.assert_close(vq.codebook[0], z.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vq.cluster_size[0], torch.tensor(18.0), rtol=1e-4, atol=1e-4)


def _rows_of(vectors: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """For each row of ``vectors``, whether it equals some position of the map ``z`` exactly."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return (vectors[:, None, :] == flat[None, :, :]).all(-1).any(-1)


def test_unused_codes_are_reseeded_from_the_batch_in_one_step():
    torch.manual_seed(7)
    vq = VectorQuantizer(16, 4, decay=0.5, dead_code_ratio=0.5)
    vq.initialized.fill_(True)  # a hand-set codebook: skip the data-dependent init
    with torch.no_grad():
        vq.codebook[0].zero_()
        vq.codebook[1:] += 20  # far away: nothing below picks codes 1..15
        vq.codebook_sum.copy_(vq.codebook)
    z = 0.1 * torch.randn(2, 4, 4, 4)

    vq.eval()
    before = vq.codebook.clone()
    vq(z)
    assert torch.equal(vq.codebook, before), "eval mode must not restart codes"

    vq.train()
    out = vq(z)
    assert out.indices.eq(0).all()
    # After one step the unused sizes are 0.5, under half of the uniform share (8 + 16) / 16.
    reseeded = _rows_of(vq.codebook, z)
    assert reseeded[1:].all(), "every unused code must now be one of the batch's vectors"
    assert not reseeded[0], "the used code follows the EMA, it is not re-seeded"
    # Code 0 started at the origin with size 1: sum 0.5 * (0 + sum z), size 0.5 * (1 + 32).
    torch.testing.assert_close(vq.codebook[0], 0.5 * z.sum(dim=(0, 2, 3)) / 16.5)
    share = vq.cluster_size.new_tensor((0.5 * 16 + 0.5 * 32) / 16)
    torch.testing.assert_close(vq.cluster_size[1:], share.expand(15))


def test_dead_codes_restart_after_a_grace_period_with_default_rule():
    """Decay 0.99, ratio 0.01: batches that only ever reach codes 0 and 1 at first."""
    torch.manual_seed(8)
    vq = VectorQuantizer(16, 4).train()  # the defaults: decay 0.99, dead_code_ratio 0.01
    vq.initialized.fill_(True)  # a hand-set codebook: skip the data-dependent init
    with torch.no_grad():
        vq.codebook[2:] += 50
        vq.codebook_sum.copy_(vq.codebook)
    centres = vq.codebook[:2].clone()
    never_used = torch.ones(16, dtype=torch.bool)
    never_used[:2] = False
    restarted_at: dict[int, int] = {}
    for step in range(600):
        side = torch.randint(0, 2, (2, 1, 4, 4))  # each position near code 0 or code 1
        z = centres[side.squeeze(1)].permute(0, 3, 1, 2) + 0.01 * torch.randn(2, 4, 4, 4)
        size_before = vq.cluster_size.clone()
        out = vq(z)
        jumped = (vq.cluster_size > size_before) & ~torch.isin(
            torch.arange(16), out.indices.unique()
        )
        for code in jumped.nonzero().flatten().tolist():
            assert _rows_of(vq.codebook[code : code + 1], z).item(), (
                f"code {code} re-seeded at step {step} to a vector not in the batch"
            )
            restarted_at.setdefault(code, step)
    unused = never_used.nonzero().flatten().tolist()
    assert set(unused) <= set(restarted_at), f"never restarted: {set(unused) - set(restarted_at)}"
    # EMA usage 0.99**t falls under 1% of the share (32 / 16 per step) after about 390 steps.
    first = min(restarted_at[c] for c in unused)
    assert 300 < first < 500, f"first restart at step {first}"


def test_quantizer_math_stays_fp32_under_autocast():
    torch.manual_seed(9)
    vq = VectorQuantizer(512, 64).eval()
    with torch.no_grad():  # codes 0.05 apart around 10: bf16 (spacing 0.0625 there) merges them
        vq.codebook.mul_(0.05).add_(10.0)
    z = (10.0 + 0.05 * torch.randn(4, 64, 8, 8)).to(torch.bfloat16)
    reference = vq(z.float())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.float32
    assert out.distance.dtype == torch.float32
    assert torch.equal(out.indices, reference.indices)
    assert torch.equal(out.distance, reference.distance)


def test_usage_reports_perplexity_and_fraction_used():
    vq = VectorQuantizer(512, 64)
    one_code = torch.full((2, 8, 8), 7)
    usage = vq.usage(one_code)
    assert usage.perplexity == pytest.approx(1.0)
    assert usage.used_fraction == pytest.approx(1 / 512)

    every_code = torch.arange(512).view(8, 8, 8)
    usage = vq.usage(every_code)
    assert usage.perplexity == pytest.approx(512.0)
    assert usage.used_fraction == pytest.approx(1.0)

    half = torch.arange(256).repeat(2).view(8, 8, 8)
    assert vq.usage(half).perplexity == pytest.approx(256.0)
    assert vq.usage(half).used_fraction == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.full((1, 8, 8), 512), r"\[0, 512\)"),
        (torch.full((1, 8, 8), -1), r"\[0, 512\)"),
        (torch.zeros(1, 8, 8, dtype=torch.float32), "integers"),
        (torch.zeros(8, 8, dtype=torch.int64), r"\(B, H, W\)"),
    ],
)
def test_lookup_rejects_bad_indices(indices, message):
    with pytest.raises(ValueError, match=message):
        VectorQuantizer(512, 64).lookup(indices)


def test_forward_rejects_a_map_of_the_wrong_depth():
    with pytest.raises(ValueError, match=r"\(B, 64, H, W\)"):
        VectorQuantizer(512, 64)(torch.randn(1, 32, 8, 8))


def test_first_training_step_seeds_the_codebook_from_the_batch():
    torch.manual_seed(9)
    vq = VectorQuantizer(32, 4).train()
    z = torch.randn(2, 4, 8, 8) * 5 + 30  # far from the N(0, 1) initial codebook
    vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    # Every code is one of the batch's vectors, moved by one EMA step toward its members.
    nearest = torch.cdist(vq.codebook, flat).min(1).values
    assert nearest.max() < 5 and bool(vq.initialized)
    assert vq.usage(vq(z).indices).used_fraction > 0.5
    before = vq.codebook.clone()
    vq.eval()(z + 100)  # eval: neither init nor EMA
    assert torch.equal(vq.codebook, before)


def test_eval_before_any_training_does_not_init():
    vq = VectorQuantizer(32, 4).eval()
    before = vq.codebook.clone()
    vq(torch.randn(1, 4, 8, 8) + 30)
    assert torch.equal(vq.codebook, before) and not bool(vq.initialized)


def test_update_mask_lets_only_the_selected_samples_move_the_codebook():
    torch.manual_seed(10)
    vq = VectorQuantizer(16, 4, dead_code_ratio=0.0).train()
    lesion = torch.randn(1, 4, 4, 4) + 20  # the sample that may move the codebook
    clean = torch.randn(1, 4, 4, 4) - 20  # ... and one that must not
    z = torch.cat([lesion, clean])
    # No selected sample: no init, no EMA step, yet the map is still quantized.
    before = vq.codebook.clone()
    out = vq(z, update=torch.tensor([False, False]))
    assert torch.equal(vq.codebook, before) and not bool(vq.initialized)
    assert out.indices.shape == (2, 4, 4)
    # The init and the EMA see only the selected sample: every code lies near +20, none near -20.
    for _ in range(5):
        vq(z, update=torch.tensor([True, False]))
    assert bool(vq.initialized)
    assert vq.codebook.mean(1).min() > 10
    same = VectorQuantizer(16, 4, dead_code_ratio=0.0).train()
    same.load_state_dict(vq.state_dict())
    vq(z, update=torch.tensor([True, False]))
    same(lesion)  # the masked pass moves the codebook exactly as the selected sample alone
    torch.testing.assert_close(vq.codebook, same.codebook)
    with pytest.raises(ValueError, match=r"update mask must have shape \(2,\)"):
        vq(z, update=torch.tensor([True]))


def test_null_code_stays_zero_through_init_ema_and_restarts():
    torch.manual_seed(11)
    vq = VectorQuantizer(16, 4, dead_code_ratio=0.5, null_code=True).train()
    z = torch.randn(2, 4, 4, 4) + 5
    positions = torch.zeros(2, 4, 4, dtype=torch.bool)
    positions[0, :2] = True  # only these positions may move the codebook
    for _ in range(20):
        vq(z, update=positions)
    assert torch.equal(vq.codebook[0], torch.zeros(4))
    # A position at the origin quantizes to the null code; the moving codes followed the
    # selected positions only.
    out = vq.eval()(torch.zeros(1, 4, 1, 1))
    assert out.indices.item() == 0
    assert vq.codebook[1:].mean() > 3


def test_reset_null_code_turns_row_zero_of_a_learnt_codebook_into_the_null_code():
    torch.manual_seed(0)
    learnt = VectorQuantizer(16, 4).train()
    learnt(torch.randn(2, 4, 3, 3))  # data init: row 0 is some encoder output
    vq = VectorQuantizer(16, 4, null_code=True)
    vq.load_state_dict(learnt.state_dict())
    assert vq.codebook[0].abs().sum() > 0
    vq.reset_null_code()
    assert torch.equal(vq.codebook[0], torch.zeros(4))
    assert torch.equal(vq.codebook[1:], learnt.codebook[1:])
    assert vq(torch.zeros(1, 4, 1, 1)).indices.item() == 0
    with pytest.raises(ValueError, match="no null code"):
        learnt.reset_null_code()
