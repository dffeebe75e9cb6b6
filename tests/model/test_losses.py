"""The five losses of Appendix C, each checked against a hand-built DecompositionOutput.

Every output field is built by hand (small tensors), so each term can be compared with a value
computed here by an independent formula rather than with the module's own arithmetic.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import preset
from model.losses import DecompositionLoss, LossWeights, RetrievalMargin, downsample_labels
from model.network import DecompositionNet, DecompositionOutput
from model.quantizer import Quantized

B, D, G, S = 4, 16, 8, 32  # batch, code dim, code grid, image side (>= the 11x11 SSIM window)
ABNORMAL = torch.tensor([True, False, True, False])  # which slices of the batch carry a lesion


def _target(abnormal: torch.Tensor = ABNORMAL, side: int = S) -> torch.Tensor:
    """(B, H, W) labels; each abnormal slice has blocks of TC (1), ED (2) and ET (3)."""
    t = torch.zeros(len(abnormal), side, side, dtype=torch.int64)
    for b, abn in enumerate(abnormal.tolist()):
        if abn:
            o = 2 * b
            t[b, 4 + o : 12 + o, 4:12] = 2  # edema, the largest class
            t[b, 6 + o : 10 + o, 6:10] = 1  # core inside it
            t[b, 16:19, 20 : 22 + b] = 3  # a small enhancing block elsewhere
    return t


def _quantized(z: torch.Tensor, e: torch.Tensor) -> Quantized:
    """A quantizer pass on z with chosen code vectors e, as model.quantizer defines it."""
    diff = (z - e) ** 2
    return Quantized(quantized=e, indices=torch.zeros(z.shape[0], *z.shape[2:], dtype=torch.int64),
                     commitment=diff.mean(), distance=diff.sum(1))


def _output(seed: int = 0, *, batch: int = B, dist_plus: torch.Tensor | None = None,
            logits: torch.Tensor | None = None, recon: torch.Tensor | None = None,
            pseudo: torch.Tensor | None = None) -> DecompositionOutput:
    g = torch.Generator().manual_seed(seed)
    z_minus, e_minus = torch.randn(2, batch, D, G, G, generator=g)
    z_plus, e_plus = torch.randn(2, batch, D, G, G, generator=g)
    plus = _quantized(z_plus, e_plus)
    if dist_plus is not None:
        plus = plus._replace(distance=dist_plus)
    # Always draw every tensor, so overriding one leaves the others as they were for that seed.
    drawn = (torch.randn(batch, 4, S, S, generator=g), torch.rand(batch, 1, S, S, generator=g),
             torch.rand(batch, 1, S, S, generator=g))
    return DecompositionOutput(
        normal_pre=z_minus, abnormal_pre=z_plus,
        normal=_quantized(z_minus, e_minus), abnormal=plus,
        logits=drawn[0] if logits is None else logits,
        reconstruction=drawn[1] if recon is None else recon,
        pseudo_normal=drawn[2] if pseudo is None else pseudo,
    )


def _image(seed: int = 100, batch: int = B) -> torch.Tensor:
    return torch.rand(batch, 1, S, S, generator=torch.Generator().manual_seed(seed))


def _terms(out: DecompositionOutput, image: torch.Tensor, target: torch.Tensor,
           weights: LossWeights | None = None) -> dict[str, torch.Tensor]:
    return DecompositionLoss(weights)(out, image, target)[1]


# ---------------------------------------------------------------- L_dis (eq. 3)

def test_dis_is_zero_when_normal_slices_are_beyond_pi():
    dist = torch.full((B, G, G), 10.5)
    dist[ABNORMAL] = 0.1  # abnormal slices close to the codebook: no concern of L_dis
    dist[1, 3, 3] = 1e4
    terms = _terms(_output(dist_plus=dist), _image(), _target())
    assert terms["dis"].item() == 0.0


def test_dis_is_the_mean_hinge_over_normal_slices():
    g = torch.Generator().manual_seed(3)
    dist = torch.rand(B, G, G, generator=g) * 20.0  # some below pi = 10, some above
    normal = dist[~ABNORMAL]
    expected = sum(max(10.0 - v, 0.0) for v in normal.flatten().tolist()) / normal.numel()
    assert expected > 0.0
    terms = _terms(_output(dist_plus=dist), _image(), _target())
    assert terms["dis"].item() == pytest.approx(expected, rel=1e-6)


def test_dis_uses_pi_from_the_weights():
    dist = torch.full((B, G, G), 3.0)
    terms = _terms(_output(dist_plus=dist), _image(), _target(), LossWeights(pi=5.0))
    assert terms["dis"].item() == pytest.approx(2.0, rel=1e-6)


def test_abnormal_distances_enter_lat_not_dis():
    dist = torch.rand(B, G, G, generator=torch.Generator().manual_seed(4)) * 20.0
    changed = dist.clone()
    changed[ABNORMAL] += 7.0  # move only the slices with a lesion
    a = _terms(_output(dist_plus=dist), _image(), _target())
    b = _terms(_output(dist_plus=changed), _image(), _target())
    assert torch.equal(a["dis"], b["dis"])
    assert b["lat"].item() > a["lat"].item() + 1e-3
    # Conversely, moving only the normal slices changes dis and leaves lat alone.
    changed = dist.clone()
    changed[~ABNORMAL] -= 5.0
    c = _terms(_output(dist_plus=changed), _image(), _target())
    assert c["dis"].item() > a["dis"].item() + 1e-3
    assert torch.equal(a["lat"], c["lat"])


def test_only_abnormal_slices_give_zero_dis_and_finite_total():
    abnormal = torch.ones(B, dtype=torch.bool)
    dist = torch.full((B, G, G), 0.5)  # far below pi: would be a large hinge on normal slices
    total, terms = DecompositionLoss()(_output(dist_plus=dist), _image(), _target(abnormal))
    assert terms["dis"].item() == 0.0
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())


def test_dis_gradient_is_minus_one_over_n_below_pi_and_zero_above():
    g = torch.Generator().manual_seed(5)
    dist = (torch.rand(B, G, G, generator=g) * 20.0).requires_grad_()
    total, _ = DecompositionLoss(LossWeights(beta=0.0, seg=0.0, rec=0.0, res=0.0))(
        _output(dist_plus=dist), _image(), _target())
    total.backward()
    n = int((~ABNORMAL).sum()) * G * G
    below = (dist.detach() < 10.0) & ~ABNORMAL[:, None, None]
    expected = torch.where(below, torch.tensor(-1.0 / n), torch.tensor(0.0))
    assert below.any() and (~below[~ABNORMAL]).any()
    torch.testing.assert_close(dist.grad, expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- L_lat (eqs. 1-2)

@pytest.mark.parametrize("beta", [0.25, 1.7])
def test_lat_is_beta_times_normal_plus_abnormal_commitment_on_abnormal_slices(beta):
    out = _output(seed=6)
    normal = ((out.normal_pre - out.normal.quantized) ** 2).mean()
    abn = ((out.abnormal_pre - out.abnormal.quantized)[ABNORMAL] ** 2).mean()
    everything = ((out.abnormal_pre - out.abnormal.quantized) ** 2).mean()
    assert abs(abn - everything) > 1e-3  # the restriction to abnormal slices is observable
    terms = _terms(out, _image(), _target(), LossWeights(beta=beta))
    assert terms["lat"].item() == pytest.approx(beta * (normal + abn).item(), rel=1e-5)


def test_lat_without_abnormal_slices_is_the_normal_commitment_only():
    out = _output(seed=7)
    terms = _terms(out, _image(), _target(torch.zeros(B, dtype=torch.bool)), LossWeights(beta=2.0))
    assert terms["lat"].item() == pytest.approx(2.0 * out.normal.commitment.item(), rel=1e-6)


# ---------------------------------------------------------------- L_seg (eqs. 4-6)

def _generalized_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    p = logits.double().softmax(1)[:, 1:]  # the 3 abnormal classes, no background
    y = F.one_hot(target, 4).permute(0, 3, 1, 2).double()[:, 1:]
    n_k = y.sum((0, 2, 3))  # summed over the batch and the pixels
    w = 1.0 / n_k**2
    inter = (w * (p * y).sum((0, 2, 3))).sum()
    union = (w * (p + y).sum((0, 2, 3))).sum()
    return 1.0 - (2.0 * inter + smooth) / (union + smooth)


def test_seg_is_generalized_dice_plus_cross_entropy():
    out = _output(seed=8)
    target = _target()
    # w_k weights make the classes of very different sizes count alike: check they differ.
    sizes = F.one_hot(target, 4).sum((0, 1, 2))[1:]
    assert len(set(sizes.tolist())) == 3
    ce = F.cross_entropy(out.logits, target).double()
    terms = _terms(out, _image(), target)
    # MONAI adds 1e-5 to numerator and denominator; with w_k = 1/n_k^2 the weighted sums are only
    # O(1/n_k), so that smoothing is part of the reference here, and without it agreement is ~1e-3.
    exact = _generalized_dice(out.logits, target, smooth=1e-5) + ce
    assert terms["seg"].item() == pytest.approx(exact.item(), abs=1e-5)
    assert terms["seg"].item() == pytest.approx(
        (_generalized_dice(out.logits, target, smooth=0.0) + ce).item(), abs=5e-3)
    # An unweighted Dice would be a different number: the weights are observable.
    p = out.logits.double().softmax(1)[:, 1:]
    y = F.one_hot(target, 4).permute(0, 3, 1, 2).double()[:, 1:]
    plain = 1.0 - 2.0 * (p * y).sum() / (p + y).sum()
    assert abs(terms["seg"].item() - (plain + ce).item()) > 1e-3


def test_seg_is_near_zero_for_perfect_confident_logits():
    target = _target()
    logits = F.one_hot(target, 4).permute(0, 3, 1, 2).float() * 40.0 - 20.0
    terms = _terms(_output(seed=9, logits=logits), _image(), target)
    assert 0.0 <= terms["seg"].item() < 1e-4
    wrong = _terms(_output(seed=9, logits=-logits), _image(), target)
    assert wrong["seg"].item() > 1.0


# ---------------------------------------------------------------- L_rec, L_res (eqs. 7-10)

def _inside(target: torch.Tensor) -> torch.Tensor:
    return (target > 0).unsqueeze(1)


def test_pseudo_normal_inside_the_lesion_does_not_matter_for_rec_minus_and_res():
    target = _target()
    out = _output(seed=10)
    noise = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(11))
    pseudo = torch.where(_inside(target), noise, out.pseudo_normal)
    assert not torch.equal(pseudo, out.pseudo_normal)
    a = _terms(out, _image(), target)
    b = _terms(_output(seed=10, pseudo=pseudo), _image(), target)
    torch.testing.assert_close(b["rec_minus"], a["rec_minus"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b["res"], a["res"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b["rec_plus"], a["rec_plus"], rtol=0, atol=0)


def test_pseudo_normal_outside_the_lesion_changes_rec_minus_and_res():
    target = _target()
    out = _output(seed=12)
    noise = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(13))
    pseudo = torch.where(_inside(target), out.pseudo_normal, noise)
    a = _terms(out, _image(), target)
    b = _terms(_output(seed=12, pseudo=pseudo), _image(), target)
    assert abs(b["rec_minus"].item() - a["rec_minus"].item()) > 1e-4
    assert abs(b["res"].item() - a["res"].item()) > 1e-4


def test_reconstruction_inside_the_lesion_changes_rec_plus():
    target = _target()
    out = _output(seed=14)
    recon = torch.where(_inside(target), 1.0 - out.reconstruction, out.reconstruction)
    a = _terms(out, _image(), target)
    b = _terms(_output(seed=14, recon=recon), _image(), target)
    assert abs(b["rec_plus"].item() - a["rec_plus"].item()) > 1e-4
    assert torch.equal(a["rec_minus"], b["rec_minus"])


def test_res_is_l1_between_pseudo_normal_and_reconstruction_on_the_normal_region():
    target = _target()
    out = _output(seed=15)
    m = _inside(target).float()
    expected = ((1.0 - m) * (out.pseudo_normal - out.reconstruction)).abs().mean()
    whole = (out.pseudo_normal - out.reconstruction).abs().mean()
    assert abs(expected - whole) > 1e-3  # the mask is observable
    terms = _terms(out, _image(), target)
    assert terms["res"].item() == pytest.approx(expected.item(), rel=1e-6)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al., 2004): 11x11 Gaussian window, sigma 1.5, valid windows only,
    data range 1; written over unfolded windows in float64, independently of MONAI's convolutions.
    """
    x = torch.arange(11, dtype=torch.float64) - 5.0
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    w = torch.outer(g, g).flatten() / g.sum() ** 2  # (121,)
    pa, pb = (F.unfold(t.double(), 11) for t in (a, b))  # (B, 121, windows)
    mu_a, mu_b = (w[:, None] * pa).sum(1), (w[:, None] * pb).sum(1)
    var_a = (w[:, None] * pa * pa).sum(1) - mu_a**2
    var_b = (w[:, None] * pb * pb).sum(1) - mu_b**2
    cov = (w[:, None] * pa * pb).sum(1) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
         / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return s.mean()  # every slice has the same number of windows: mean over slices of means


def _l2_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double() - b.double()) ** 2).mean() + 1.0 - _ssim(a, b)


def test_rec_terms_are_l2_plus_one_minus_ssim_on_their_regions():
    target = _target()
    image = _image(20)
    out = _output(seed=20)
    m = _inside(target).double()
    x_minus, x_plus = out.pseudo_normal.double(), out.reconstruction.double()
    rec_minus = _l2_ssim((1 - m) * x_minus, (1 - m) * image)
    rec_plus = _l2_ssim(x_plus, image) + _l2_ssim(m * x_plus, m * image)
    terms = _terms(out, image, target)
    assert terms["rec_minus"].item() == pytest.approx(rec_minus.item(), abs=1e-5)
    assert terms["rec_plus"].item() == pytest.approx(rec_plus.item(), abs=1e-5)
    assert terms["rec"].item() == pytest.approx((rec_minus + rec_plus).item(), abs=2e-5)


def test_rec_and_res_vanish_when_both_images_equal_the_input():
    target = _target()
    image = _image(16)
    out = _output(seed=16, recon=image.clone(), pseudo=image.clone())
    terms = _terms(out, image, target)
    assert abs(terms["rec"].item()) < 1e-6
    assert abs(terms["rec_minus"].item()) < 1e-6 and abs(terms["rec_plus"].item()) < 1e-6
    assert terms["res"].item() == 0.0
    # and a visibly different reconstruction does not vanish
    other = _terms(_output(seed=16, recon=1.0 - image, pseudo=image.clone()), image, target)
    assert other["rec"].item() > 0.1


# ---------------------------------------------------------------- total

def test_total_is_the_weighted_sum_of_the_terms():
    w = LossWeights(beta=0.7, dis=0.3, seg=2.5, rec=40.0, res=3.0, pi=12.0)
    dist = torch.rand(B, G, G, generator=torch.Generator().manual_seed(17)) * 20.0
    total, terms = DecompositionLoss(w)(_output(seed=17, dist_plus=dist), _image(), _target())
    for name in ("lat", "dis", "seg", "rec", "res"):
        assert terms[name].item() > 0.0, name
    expected = (terms["lat"] + w.dis * terms["dis"] + w.seg * terms["seg"]
                + w.rec * terms["rec"] + w.res * terms["res"])
    torch.testing.assert_close(total.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["total"], total.detach())
    torch.testing.assert_close(terms["rec"], terms["rec_minus"] + terms["rec_plus"])
    assert not any(v.requires_grad for v in terms.values())


def test_batch_without_lesions_is_finite_and_seg_reduces_to_cross_entropy():
    target = _target(torch.zeros(B, dtype=torch.bool))
    out = _output(seed=21)
    total, terms = DecompositionLoss()(out, _image(), target)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    # No abnormal class present: every Dice weight is inf -> 0, so only the smoothing is left.
    ce = F.cross_entropy(out.logits, target)
    assert terms["seg"].item() == pytest.approx(ce.item(), abs=1e-5)


def test_labels_are_downsampled_by_majority_with_ties_to_the_lesion():
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    t[0, 0, :2] = 1  # block (0, 0): two TC, two ED -> TC (lower lesion class on a tie)
    t[0, 1, :2] = 2
    t[0, 2:, 2:] = 3  # block (1, 1): all ET
    t[0, 2, 0] = 2  # block (1, 0): one ED, three background -> background
    t[0, 0, 2:] = 3  # block (0, 1): two ET, two background -> ET (lesion wins a tie)
    assert downsample_labels(t, 2, 4).tolist() == [[[1, 3], [0, 3]]]
    assert downsample_labels(t, 4, 4) is t


def test_losses_compare_at_the_outputs_resolution():
    """A 128 x 128 network's outputs are compared with the slice brought to 128 x 128."""
    image = torch.rand(2, 1, 256, 256)
    target = torch.zeros(2, 256, 256, dtype=torch.long)
    small = torch.nn.functional.avg_pool2d(image, 2)
    torch.manual_seed(0)
    net = DecompositionNet(preset("cpu")).train()
    out = net(image)
    perfect = DecompositionOutput(**{**vars(out), "reconstruction": small,
                                     "pseudo_normal": small})
    _, terms = DecompositionLoss(LossWeights())(perfect, image, target)
    assert terms["rec"].item() < 1e-5 and terms["res"].item() == 0


def test_null_code_terms_pull_normal_positions_to_zero_and_push_lesion_positions_away():
    import dataclasses

    torch.manual_seed(0)
    net = DecompositionNet(dataclasses.replace(preset("tiny"), abnormal_null_code=True)).train()
    image = torch.rand(2, 1, 256, 256)
    target = torch.zeros(2, 256, 256, dtype=torch.long)
    target[0, :32, :32] = 2  # exactly the top-left code cell of slice 0
    out = net(image)
    criterion = DecompositionLoss(LossWeights(beta=1.0, pi=1e6), null_code=True)
    _, terms = criterion(out, image, target)
    z = out.abnormal_pre.detach()
    normal_cells = torch.ones(2, 8, 8, dtype=torch.bool)
    normal_cells[0, 0, 0] = False
    expected_pull = (z.pow(2).sum(1)[normal_cells] / z.shape[1]).mean()
    expected_commit = out.abnormal.distance[0, 0, 0] / z.shape[1]
    expected_lat = out.normal.commitment + expected_commit + expected_pull
    assert torch.allclose(terms["lat"], expected_lat.detach(), rtol=1e-5)
    assert torch.allclose(terms["commit_abn_lesion"], expected_commit.detach(), rtol=1e-5)
    expected_dis = 1e6 - z[0, :, 0, 0].pow(2).sum()  # the hinge at the one lesion cell
    assert torch.allclose(terms["dis"], expected_dis, rtol=1e-5)


def test_null_code_by_slice_pulls_every_position_of_a_lesion_free_slice_only():
    import dataclasses

    torch.manual_seed(0)
    net = DecompositionNet(dataclasses.replace(preset("tiny"), abnormal_null_code=True)).train()
    image = torch.rand(2, 1, 256, 256)
    target = torch.zeros(2, 256, 256, dtype=torch.long)
    target[0, :32, :32] = 2  # slice 0 has a lesion in one cell; slice 1 has none
    out = net(image)
    criterion = DecompositionLoss(LossWeights(beta=1.0, pi=1e6), null_code=True,
                                  null_by_slice=True)
    _, terms = criterion(out, image, target)
    z = out.abnormal_pre.detach()
    # Every position of slice 0 commits to its code and is held pi from the null code, the
    # lesion-free cells included; every position of slice 1 is pulled to the null code, in
    # L_dis at the hinge's scale.
    expected_commit = (out.abnormal.distance[0] / z.shape[1]).mean()
    expected_lat = out.normal.commitment + expected_commit
    assert torch.allclose(terms["lat"], expected_lat.detach(), rtol=1e-5)
    expected_dis = (1e6 - z[0].pow(2).sum(0)).mean() + z[1].pow(2).sum(0).mean()
    assert torch.allclose(terms["dis"], expected_dis, rtol=1e-5)


def _codes(*rows: list[float]) -> torch.Tensor:
    """(B, 1, 1, N) codes from rows of numbers."""
    return torch.tensor(rows, dtype=torch.float32)[:, None, None, :]


def test_retrieval_margin_is_zero_when_every_ranking_holds_with_its_margin():
    margin = RetrievalMargin(k=1, margin=0.5)
    # Two lesion slices near each other, two clean ones near each other, far apart.
    codes = _codes([0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0])
    lesion = torch.tensor([True, True, False, False])
    cost = margin(codes, lesion, torch.arange(4))
    assert float(cost) == 0.0


def test_retrieval_margin_costs_a_wrong_status_neighbour_nearer_than_the_kth_right_one():
    margin = RetrievalMargin(k=1, margin=0.0)
    # Slice 0 (lesion) lies next to clean slice 2 and far from lesion slice 1.
    codes = _codes([0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [4.0, 0.0]).requires_grad_()
    lesion = torch.tensor([True, True, False, False])
    cost = margin(codes, lesion, torch.arange(4))
    # Mean squared differences over N = 2: slice 0's nearest lesion d_k = 4.5, clean 0.5:
    # relu(1 - 0.5 / 4.5); the others' costs follow the same rule.
    d = torch.cdist(codes.detach().flatten(1), codes.detach().flatten(1)).pow(2) / 2
    expected = []
    for i in range(4):
        same = [j for j in range(4) if j != i and lesion[j] == lesion[i]]
        other = [j for j in range(4) if lesion[j] != lesion[i]]
        d_k = min(d[i, j] for j in same)
        expected.append(max(0.0, float(1 - min(d[i, j] for j in other) / d_k)))
    assert cost.item() == pytest.approx(sum(expected) / 4, rel=1e-4)
    assert cost.item() > 0
    cost.backward()
    # Lowering the cost moves slice 0 away from the clean slice 2 (towards negative x).
    assert codes.grad[0, 0, 0, 0] > 0


def test_retrieval_margin_ignores_the_query_patients_own_slices_and_keeps_a_bank():
    margin = RetrievalMargin(k=1, margin=0.0, bank_size=3)
    codes = _codes([0.0, 0.0], [0.1, 0.0], [0.2, 0.0])
    lesion = torch.tensor([True, True, False])
    # Slices 0 and 1 are one patient: slice 0 has no other-patient lesion slice, no cost;
    # slice 2 (clean, patient 1) has no other clean slice, no cost.
    assert float(margin(codes, lesion, torch.tensor([0, 0, 1]))) == 0.0
    assert margin.codes.shape == (3, 2) and margin.lesion.tolist() == [True, True, False]
    # The next batch sees the bank: a lesion slice of patient 2 at the banked clean slice.
    cost = margin(_codes([0.2, 0.0]), torch.tensor([True]), torch.tensor([2]))
    assert float(cost) > 0
    assert margin.codes.shape == (3, 2)  # the bank keeps its size, newest first
    assert margin.patient.tolist() == [2, 0, 0]


def test_total_includes_the_weighted_retrieval_margin_only_when_it_is_on():
    torch.manual_seed(0)
    model = DecompositionNet(preset("tiny"))
    x = torch.rand(4, 1, 256, 256)
    target = torch.zeros(4, 256, 256, dtype=torch.long)
    target[:2, 80:120, 80:120] = 2
    out = model(x)
    plain_total, plain = DecompositionLoss(LossWeights(rec=5.0))(out, x, target)
    assert "sep" not in plain
    on = DecompositionLoss(LossWeights(rec=5.0, sep=2.0))
    with pytest.raises(ValueError, match="patient numbers"):
        on(out, x, target)
    total, terms = on(out, x, target, torch.arange(4))
    assert total.item() == pytest.approx(plain_total.item() + 2.0 * terms["sep"].item(),
                                         rel=1e-5)


def _bf16_output() -> DecompositionOutput:
    """The outputs as CUDA autocast hands them over: logits and images in bf16."""
    out = _output(3)
    return dataclasses.replace(out, logits=out.logits.bfloat16(),
                               reconstruction=out.reconstruction.bfloat16(),
                               pseudo_normal=out.pseudo_normal.bfloat16())


def test_loss_terms_are_fp32_when_the_outputs_arrive_in_bf16():
    """Under CUDA autocast the decoders' outputs are bf16; every term is computed in fp32 on
    the same values (a bf16 input against an fp32 target fails in backward on CUDA)."""
    image, target = torch.rand(B, 1, S, S), _target()
    loss = DecompositionLoss(LossWeights(rec=5.0))
    low = _bf16_output()
    total, terms = loss(low, image, target)
    assert all(v.dtype == torch.float32 for v in terms.values())
    widened = dataclasses.replace(low, logits=low.logits.float(),
                                  reconstruction=low.reconstruction.float(),
                                  pseudo_normal=low.pseudo_normal.float())
    reference, _ = loss(widened, image, target)
    assert torch.equal(total, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_bf16_autocast_training_step_runs_backward_on_cuda():
    torch.manual_seed(0)
    model = DecompositionNet(preset("tiny")).cuda().train()
    x = torch.rand(2, 1, 256, 256, device="cuda")
    target = torch.zeros(2, 256, 256, dtype=torch.int64, device="cuda")
    target[0, 100:140, 100:140] = 2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, lesion=(target > 0).flatten(1).any(1))
    total, _ = DecompositionLoss(LossWeights(rec=5.0))(out, x, target)
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_gate_term_is_the_cross_entropy_of_the_gate_logit_against_lesion_slices():
    image, target = torch.rand(B, 1, S, S), _target()
    logit = torch.tensor([2.0, -1.0, -3.0, 0.5])
    out = dataclasses.replace(_output(4), gate_logit=logit)
    plain_total, plain_terms = DecompositionLoss(LossWeights(rec=5.0))(out, image, target)
    assert "gate" not in plain_terms  # weight 0: off
    total, terms = DecompositionLoss(LossWeights(rec=5.0, gate=2.0))(out, image, target)
    # By hand: -mean(y log s(l) + (1 - y) log(1 - s(l))), y = ABNORMAL = 1, 0, 1, 0.
    s = torch.sigmoid(logit)
    y = ABNORMAL.float()
    expected = -(y * s.log() + (1 - y) * (1 - s).log()).mean()
    assert terms["gate"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(plain_total.item() + 2.0 * expected.item(), rel=1e-5)
    # A model without a gate has no logit: the weight then adds nothing.
    _, no_gate = DecompositionLoss(LossWeights(rec=5.0, gate=2.0))(_output(4), image, target)
    assert "gate" not in no_gate


def test_gate_by_position_adds_each_positions_cross_entropy_against_its_cell():
    image, target = torch.rand(B, 1, S, S), _target()
    logit = torch.tensor([2.0, -1.0, -3.0, 0.5])
    positions = torch.randn(B, G, G, generator=torch.Generator().manual_seed(3))
    slice_only = dataclasses.replace(_output(4), gate_logit=logit)
    by_position = dataclasses.replace(slice_only, gate_positions=positions)
    loss = DecompositionLoss(LossWeights(rec=5.0, gate=2.0))
    total_slice, slice_terms = loss(slice_only, image, target)
    total, terms = loss(by_position, image, target)
    # By hand: a position's cell is its S/G x S/G block of the target; it has lesion when any
    # pixel of the block does.
    cell = S // G
    cells = torch.zeros(B, G, G)
    for b, i, j in itertools.product(range(B), range(G), range(G)):
        cells[b, i, j] = float((target[b, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
                                > 0).any())
    assert 0 < cells.sum() < cells.numel() and cells[1].sum() == 0 == cells[3].sum()
    s = torch.sigmoid(positions)
    expected = -(cells * s.log() + (1 - cells) * (1 - s).log()).mean()
    assert terms["gate_positions"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["gate"].item() == pytest.approx(slice_terms["gate"].item() + expected.item(),
                                                 rel=1e-5)
    assert total.item() == pytest.approx(total_slice.item() + 2.0 * expected.item(), rel=1e-5)


def test_gate_term_counts_a_lesion_too_small_to_survive_the_downsampling():
    """The slice's label is read at slice size, before the cpu preset's 128 x 128 resize."""
    image = torch.rand(1, 1, 2 * S, 2 * S)
    target = torch.zeros(1, 2 * S, 2 * S, dtype=torch.int64)
    target[0, 10, 10] = 3  # one pixel
    out = dataclasses.replace(_output(5, batch=1), gate_logit=torch.tensor([2.0]))
    _, terms = DecompositionLoss(LossWeights(rec=5.0, gate=1.0))(out, image, target)
    # log(1 + e^-2) = 0.127 for a lesion slice; a lesion-free one would give 2.127.
    assert terms["gate"].item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)
