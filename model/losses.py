"""The five training losses of the paper (Appendix C) and their weighted total.

``L_total = L_lat + l1 L_dis + l2 L_seg + l3 L_rec + l4 L_res``

Generalized Dice comes from MONAI, SSIM from ``model.ssim`` (MONAI's value, computed separably);
what is specific to this method (the masks, the hinge of L_dis, the split of the abnormal
commitment by slice) is written here. The losses compare at the network's resolution: the
image and labels are brought to the outputs' size (``downsample_labels``) when the preset runs
smaller than the slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss
from torch import Tensor

from model.network import DecompositionOutput
from model.ssim import ssim_loss


def downsample_labels(target: Tensor, size: int, num_classes: int) -> Tensor:
    """Class maps (B, H, W) -> (B, size, size) by majority over each block of pixels.

    Ties go to a lesion class over background (and to the lower class among lesion classes), so
    a thin rim or a small core is not erased by the resizing.
    """
    if target.shape[-1] == size:
        return target
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    votes = F.interpolate(onehot, size=size, mode="area")  # (B, K, size, size)
    votes[:, 1:] += 1e-3 * torch.arange(num_classes - 1, 0, -1, device=votes.device)[:, None,
                                                                                      None]
    return votes.argmax(1)


@dataclass
class LossWeights:
    """Loss weights; defaults are the paper's (Appendix D)."""

    beta: float = 0.25  # commitment weight of eq. (1) (VQ-VAE's value; the paper does not say)
    dis: float = 1.0  # l1, on L_dis (eq. 3)
    seg: float = 1.0  # l2, on L_seg (eq. 6)
    rec: float = 1e4  # l3, on L_rec (eq. 9); the authors' code uses 5
    res: float = 1.0  # l4, on L_res (eq. 10)
    pi: float = 10.0  # threshold of the hinge in L_dis (eq. 3)
    # Not in the paper: the abnormal-space retrieval margin (``RetrievalMargin``); 0 is off.
    sep: float = 0.0
    sep_margin: float = 0.5  # a wrong-status neighbour must lie (1 + margin) x farther
    # Not in the paper: binary cross-entropy of the abnormal gate's logit (ModelConfig.
    # abnormal_gate) against whether the slice has a lesion at slice size, plus, with
    # gate_by_position, of each position's logit against whether its cell holds lesion; 0 is
    # off. Without it the gate learns only through L_dis, and stays shut on small lesions.
    gate: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class RetrievalMargin:
    """A top-k retrieval margin in the abnormal code space (our addition; off by default).

    The acceptance of the abnormal space is a retrieval one: the top-5 of a lesion slice should
    have lesions, those of a lesion-free slice none. The paper's losses do not ask for it: L_dis
    only keeps lesion-free slices off the codebook, and their quantized codes then follow
    anatomy, so the L2 distance between two slices' abnormal codes is mostly anatomy. This term
    asks for the ranking itself. For every slice of the batch, among candidates of other
    patients (the rest of the batch, and a bank of the last ``bank_size`` slices' detached
    codes), let d_k be the squared distance to its k-th nearest candidate of the same lesion
    status; each of its k nearest candidates of the other status costs
    ``relu(1 + margin - d / d_k)``. Distances are taken on the quantized codes (the straight-
    through gradient reaches the encoder), as retrieval measures them.
    """

    def __init__(self, k: int = 5, margin: float = 0.5, bank_size: int = 512):
        self.k, self.margin, self.bank_size = k, margin, bank_size
        self.codes = torch.zeros(0)
        self.lesion = torch.zeros(0, dtype=torch.bool)
        self.patient = torch.zeros(0, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"codes": self.codes, "lesion": self.lesion, "patient": self.patient}

    def load_state_dict(self, state: dict) -> None:
        self.codes, self.lesion, self.patient = state["codes"], state["lesion"], state["patient"]

    def __call__(self, codes: Tensor, lesion: Tensor, patient: Tensor) -> Tensor:
        """``codes`` (B, D, H, W) quantized abnormal codes; ``lesion`` (B,) bool; ``patient``
        (B,) int64 patient numbers. Returns the mean cost and pushes the batch into the bank."""
        q = codes.float().flatten(1)  # (B, N)
        bank = self.codes.to(q.device)
        cand = torch.cat([q, bank])  # (B + M, N)
        cand_lesion = torch.cat([lesion, self.lesion.to(lesion.device)])
        cand_patient = torch.cat([patient, self.patient.to(patient.device)])
        d = torch.cdist(q, cand).pow(2) / q.shape[1]  # (B, B + M), mean squared difference
        other = patient[:, None] != cand_patient[None]  # own patient (and self) excluded
        same = lesion[:, None] == cand_lesion[None]
        cost = []
        for i in range(q.shape[0]):
            pos = d[i][other[i] & same[i]]
            neg = d[i][other[i] & ~same[i]]
            if pos.numel() == 0 or neg.numel() == 0:
                continue
            d_k = pos.topk(min(self.k, pos.numel()), largest=False).values[-1]
            nearest_neg = neg.topk(min(self.k, neg.numel()), largest=False).values
            cost.append(F.relu(1 + self.margin - nearest_neg / (d_k + 1e-6)).mean())
        self.codes = torch.cat([q.detach().cpu(), self.codes])[:self.bank_size]
        self.lesion = torch.cat([lesion.cpu(), self.lesion])[:self.bank_size]
        self.patient = torch.cat([patient.cpu(), self.patient])[:self.bank_size]
        return torch.stack(cost).mean() if cost else q.sum() * 0.0


class DecompositionLoss(torch.nn.Module):
    """Callable ``(output, image, target) -> (total, terms)``.

    ``image`` (B, 1, H, W) in [0, 1] at slice size; ``target`` (B, H, W) int64 classes
    0 background, 1 TC, 2 ED, 3 ET. ``terms`` holds every loss term as a detached float
    tensor, for logging.
    """

    def __init__(self, weights: LossWeights | None = None,
                 ssim: Callable[[Tensor, Tensor], Tensor] = ssim_loss, null_code: bool = False,
                 null_by_slice: bool = False):
        super().__init__()
        self.weights = weights or LossWeights()
        self.null_code = null_code  # the abnormal codebook's row 0 is the null code (config)
        # The null code's unit: every position of a lesion-free slice (True), or every
        # position whose cell holds no lesion pixel (False).
        self.null_by_slice = null_by_slice
        self.ssim = ssim  # 1 - SSIM; MONAI's SSIMLoss is the plain equivalent
        # eq. (4): classes are the abnormal ones only (K = 3), w_k = 1 / (sum y_k)^2; summed over
        # the whole batch so a batch with one tiny lesion still has a finite weight.
        self.margin = RetrievalMargin(margin=self.weights.sep_margin) if self.weights.sep else None
        self.dice = GeneralizedDiceLoss(include_background=False, to_onehot_y=True, softmax=True,
                                        w_type="square", batch=True)

    def _null_code_terms(self, out: DecompositionOutput, mask: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """L_lat and L_dis by code position, with the abnormal codebook's null code (row 0 = 0).

        A position is abnormal when any lesion pixel lies in its cell of the image (with
        ``null_by_slice``: when any lesion pixel lies anywhere in its slice). Abnormal
        positions: the usual commitment to their code, and the hinge of eq. (3) keeps them at
        least pi from the null code. Normal positions, in every slice: commitment to the null
        code, ||z_e+||^2, so that all of them quantize to it.

        With ``null_by_slice`` the pull is a term of L_dis, at the hinge's scale (squared
        distance per position, not per element): a lesion-free slice is pulled to the null code
        as hard as a lesion slice is pushed from it. At the commitment's scale (beta, per
        element, 256x weaker) the pull moved no lesion-free slice onto the null code in 500
        steps warm-started from the shipped checkpoint.
        """
        w = self.weights
        z = out.abnormal_pre.float()  # (B, D, 8, 8)
        cells = F.adaptive_max_pool2d(mask, z.shape[-2:])[:, 0] > 0  # (B, 8, 8)
        if self.null_by_slice:
            cells = cells.flatten(1).any(1)[:, None, None].expand_as(cells)
        per_element = out.abnormal.distance / z.shape[1]  # (B, 8, 8)
        to_null = z.pow(2).sum(1)  # (B, 8, 8): squared distance to the null code
        zero = z.sum() * 0.0
        commit_plus = per_element[cells].mean() if cells.any() else zero
        hinge = F.relu(w.pi - to_null[cells]).mean() if cells.any() else zero
        if self.null_by_slice:
            l_lat = w.beta * (out.normal.commitment + commit_plus)
            pull = to_null[~cells].mean() if (~cells).any() else zero
            return l_lat, commit_plus, hinge + pull
        null_pull = (to_null[~cells] / z.shape[1]).mean() if (~cells).any() else zero
        l_lat = w.beta * (out.normal.commitment + commit_plus + null_pull)
        return l_lat, commit_plus, hinge

    def _l2_ssim(self, a: Tensor, b: Tensor) -> Tensor:
        return F.mse_loss(a, b) + self.ssim(a, b)

    def forward(self, out: DecompositionOutput, image: Tensor, target: Tensor,
                patient: Tensor | None = None):
        """``patient`` (B,) int64 patient numbers: needed when the retrieval margin is on."""
        w = self.weights
        target_full = target  # at slice size, before resizing
        lesion_slice = (target > 0).flatten(1).any(dim=1)
        size = out.reconstruction.shape[-1]
        if image.shape[-1] != size:  # the preset runs below slice size: compare at its size
            image = F.interpolate(image, size=size, mode="area")
            target = downsample_labels(target, size, out.logits.shape[1])
        mask = (target > 0).unsqueeze(1).to(image.dtype)  # M: (B, 1, H, W)
        normal_region = 1.0 - mask  # M-bar
        abnormal_slice = mask.flatten(1).any(dim=1)  # (B,)
        code_dim = out.abnormal_pre.shape[1]

        dist_plus = out.abnormal.distance  # (B, 8, 8): ||z_e+ - sg[e+]||^2 per position
        if self.null_code:
            l_lat, commit_plus, l_dis = self._null_code_terms(out, mask)
        else:
            # eqs. (1)-(2) with EMA codebooks: only the commitment term trains the encoder. On
            # the abnormal path it applies to slices with abnormality; the others get L_dis.
            commit_plus = (dist_plus[abnormal_slice].sum() / (dist_plus[0].numel() * code_dim)
                           / max(int(abnormal_slice.sum()), 1))
            l_lat = w.beta * (out.normal.commitment + commit_plus)
            # eq. (3): push z_e+ of slices without abnormality at least pi from the codebook.
            hinge = F.relu(w.pi - dist_plus[~abnormal_slice])
            l_dis = hinge.mean() if hinge.numel() else dist_plus.sum() * 0.0

        # eqs. (4)-(6). Every loss in fp32: under CUDA autocast the outputs arrive in bf16, and
        # a loss of a bf16 input against an fp32 target fails in backward.
        logits = out.logits.float()
        l_seg = self.dice(logits, target.unsqueeze(1)) + F.cross_entropy(logits, target)

        # eqs. (7)-(9)
        x_minus, x_plus = out.pseudo_normal.float(), out.reconstruction.float()
        l_rec_minus = self._l2_ssim(normal_region * x_minus, normal_region * image)
        l_rec_plus = self._l2_ssim(x_plus, image) + self._l2_ssim(mask * x_plus, mask * image)
        l_rec = l_rec_minus + l_rec_plus

        # eq. (10)
        l_res = (normal_region * (x_minus - x_plus)).abs().mean()

        total = l_lat + w.dis * l_dis + w.seg * l_seg + w.rec * l_rec + w.res * l_res
        extra = {}
        if w.gate and out.gate_logit is not None:
            extra["gate"] = F.binary_cross_entropy_with_logits(out.gate_logit.float(),
                                                               lesion_slice.float())
            if out.gate_positions is not None:  # each position against its cell, at 256
                cells = F.adaptive_max_pool2d((target_full > 0).unsqueeze(1).float(),
                                              out.gate_positions.shape[-2:])[:, 0]
                extra["gate_positions"] = F.binary_cross_entropy_with_logits(
                    out.gate_positions.float(), cells)
                extra["gate"] = extra["gate"] + extra["gate_positions"]
            total = total + w.gate * extra["gate"]
        if self.margin is not None:
            if patient is None:
                raise ValueError("the retrieval margin needs the slices' patient numbers")
            extra["sep"] = self.margin(out.abnormal.quantized, lesion_slice, patient)
            total = total + w.sep * extra["sep"]
        terms = {**extra, "total": total, "lat": l_lat, "dis": l_dis, "seg": l_seg, "rec": l_rec,
                 "rec_minus": l_rec_minus, "rec_plus": l_rec_plus, "res": l_res,
                 "commit_normal": out.normal.commitment, "commit_abn_lesion": commit_plus}
        return total, {k: v.detach() for k, v in terms.items()}
