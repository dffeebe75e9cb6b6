"""Held-out evaluation during training: what the model draws, segments and retrieves.

Every figure the model issue's acceptance names is computed here on the held-out patients, so a
training run's log says whether a checkpoint is shippable:

- segmentation Dice per class (TC, ED, ET) and of the whole lesion, at slice size;
- reconstruction x_hat+ against the input: SSIM and MAE inside the brain;
- pseudo-normal x_hat- against the lesion-free twin (synthetic cohorts): SSIM and MAE inside the
  lesion and in the brain outside it, beside the input's own MAE to the twin inside the lesion;
- retrieval among the held-out slices, each query's own patient excluded: of a lesion slice's
  top-5 in the abnormal space, the share with a lesion; of a lesion-free slice's, the share
  without; in the normal space, how many of a lesion slice's top-5 its lesion-free twin's
  top-5 shares (the normal code should not see the lesion);
- codebook perplexity and used fraction on held-out data; commitment per quantizer.

``score`` sums seven of them, each in [0, 1], into the number checkpoint selection maximises.

``monitor`` measures the same model on other cohorts (real scans) with the held-out slices as
the reference set: the figures ``cbir eval`` reports on them, per slice as it computes them. They
go to the training log beside the held-out figures and never into ``score``: a checkpoint is
selected on synthetic held-out patients only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from model.metrics import SSIM_WINDOW, dice_counts, dice_from_counts, ssim_map
from model.network import DecompositionNet

CLASS_NAMES = ("TC", "ED", "ET")
TOP_K = 5
_HALF = SSIM_WINDOW // 2  # ssim_map covers the window centres, (H - 10) x (W - 10)

# The seven held-out figures, each in [0, 1], that checkpoint selection adds up.
SCORE_TERMS = ("dice_whole", "dice_class_mean", "rec_ssim_brain", "pn_ssim_out",
               "abn_lesion_at5", "abn_clean_at5", "normal_twin_at5")


def _masked_sum(values: Tensor, region: Tensor) -> tuple[float, int]:
    return float(values[region].sum()), int(region.sum())


class _Sums:
    """Running sums and counts of masked means."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, key: str, values: Tensor, region: Tensor) -> None:
        s, n = _masked_sum(values, region)
        acc = self.sums.setdefault(key, [0.0, 0])
        acc[0] += s
        acc[1] += n

    def mean(self, key: str) -> float | None:
        s, n = self.sums.get(key, (0.0, 0))
        return s / n if n else None


def _top_k_excluding_own(query: Tensor, query_pid: list[str], ref: Tensor, ref_pid: list[str],
                         k: int) -> list[list[int]]:
    """Per query, the indices of its k nearest references (L2) of another patient, nearest
    first (fewer when fewer such references exist)."""
    d = torch.cdist(query.double(), ref.double())  # (Q, R)
    same = torch.tensor([[q == r for r in ref_pid] for q in query_pid], dtype=torch.bool)
    d = d.masked_fill(same, float("inf"))
    values, indices = d.topk(min(k, d.shape[1]), largest=False)  # (Q, k)
    return [[int(i) for i, v in zip(row, vals, strict=True) if v != float("inf")]
            for row, vals in zip(indices, values, strict=True)]


def _usage(indices: Tensor, size: int) -> dict:
    counts = torch.bincount(indices.flatten(), minlength=size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": round(float(entropy.exp()), 2),
            "used": round(float((counts > 0).double().mean()), 4)}


@torch.no_grad()
def evaluate(model: DecompositionNet, dataset: Dataset, indices: list[int],
             device: torch.device, batch_size: int = 32, monitor: Dataset | None = None) -> dict:
    """Every held-out figure over ``dataset[indices]``, and under ``"monitor"`` the figures of
    ``monitor`` (``monitor_figures``); the model is left in the mode it had."""
    was_training = model.training
    model.eval()
    sums = _Sums()
    counts = torch.zeros(len(CLASS_NAMES) + 1, 3, dtype=torch.float64)
    normal_codes, abnormal_codes, twin_codes, twin_of = [], [], [], []
    pids: list[str] = []
    lesion_flags: list[bool] = []
    normal_idx, abnormal_idx = [], []
    commit = {"normal": [0.0, 0], "abnormal": [0.0, 0]}
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(device)  # (B, 1, 256, 256)
        target = torch.stack([it["abnormal"] for it in items]).to(device)  # (B, 256, 256)
        healthy = torch.stack([it["healthy"] for it in items]).to(device)  # (B, 1, 256, 256)
        drawn = model.draw(x)
        codes = drawn.codes
        lesion = (target > 0)[:, None]  # (B, 1, H, W)
        has_lesion = lesion.flatten(1).any(1)  # (B,)
        brain = x > 0
        rec = drawn.reconstruction.clamp(0, 1)
        pn = drawn.pseudo_normal.clamp(0, 1)
        inner = (..., slice(_HALF, -_HALF), slice(_HALF, -_HALF))
        sums.add("rec_ssim_brain", ssim_map(rec, x), brain[inner])
        sums.add("rec_mae_brain", (rec - x).abs(), brain)
        twin = (healthy >= 0).flatten(1).all(1)  # (B,) the lesion-free twin exists
        if twin.any():
            h = healthy[twin]
            les, br = lesion[twin], brain[twin]
            out_region = ~les & br
            s = ssim_map(pn[twin], h)
            sums.add("pn_ssim_in", s, les[inner])
            sums.add("pn_ssim_out", s, out_region[inner])
            sums.add("pn_mae_in", (pn[twin] - h).abs(), les)
            sums.add("pn_mae_out", (pn[twin] - h).abs(), out_region)
            sums.add("input_mae_in", (x[twin] - h).abs(), les)
            with_twin = twin & has_lesion
            if with_twin.any():
                twin_codes.append(model.encode(healthy[with_twin]).normal.flatten(1).cpu())
                base = start
                twin_of += [base + int(i) for i in with_twin.nonzero().flatten()]
        has_seg = torch.tensor([bool(it["has_seg"]) for it in items], device=device)
        if has_seg.any():
            pred = drawn.logits[has_seg].argmax(1).cpu()
            truth = target[has_seg].cpu()
            counts[:3] += dice_counts(pred, truth, 4)
            whole = dice_counts((pred > 0).long(), (truth > 0).long(), 2)
            counts[3:] += whole
        d_n = (codes.normal_pre - codes.normal).pow(2).mean((1, 2, 3))  # (B,)
        d_a = (codes.abnormal_pre - codes.abnormal).pow(2).mean((1, 2, 3))
        commit["normal"][0] += float(d_n.sum())
        commit["normal"][1] += len(items)
        commit["abnormal"][0] += float(d_a[has_lesion].sum())
        commit["abnormal"][1] += int(has_lesion.sum())
        normal_codes.append(codes.normal.flatten(1).cpu())
        abnormal_codes.append(codes.abnormal.flatten(1).cpu())
        normal_idx.append(codes.normal_indices.cpu())
        abnormal_idx.append(codes.abnormal_indices[has_lesion].cpu())
        pids += [it["pid"] for it in items]
        lesion_flags += has_lesion.cpu().tolist()

    dice = dice_from_counts(counts)
    metrics: dict = {key: sums.mean(key) for key in (
        "rec_ssim_brain", "rec_mae_brain", "pn_ssim_in", "pn_ssim_out", "pn_mae_in",
        "pn_mae_out", "input_mae_in")}
    for name, d in zip((*CLASS_NAMES, "whole"), dice, strict=True):
        metrics[f"dice_{name}"] = d
    class_dice = [d for d in dice[:3] if d is not None]
    metrics["dice_class_mean"] = sum(class_dice) / len(class_dice) if class_dice else None
    metrics.update(_retrieval(normal_codes, abnormal_codes, twin_codes, twin_of, pids,
                              lesion_flags))
    size = model.config.codebook_size
    metrics["cb_normal"] = _usage(torch.cat(normal_idx), size)
    metrics["cb_abnormal"] = (_usage(torch.cat(abnormal_idx), size)
                              if sum(map(len, abnormal_idx)) else None)
    metrics["commit_normal"] = commit["normal"][0] / max(commit["normal"][1], 1)
    metrics["commit_abn_lesion"] = (commit["abnormal"][0] / commit["abnormal"][1]
                                    if commit["abnormal"][1] else None)
    metrics["slices"] = len(indices)
    metrics["score"] = score(metrics)
    if monitor is not None and len(monitor):
        metrics["monitor"] = monitor_figures(model, monitor, torch.cat(abnormal_codes),
                                             torch.tensor(lesion_flags), device, batch_size)
    model.train(was_training)
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}


def _slice_dice(pred: Tensor, truth: Tensor) -> float | None:
    """Dice of two masks of one slice; None where neither has any (``cbir eval``'s rule)."""
    total = int(pred.sum()) + int(truth.sum())
    return None if total == 0 else 2 * int((pred & truth).sum()) / total


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 5) if kept else None


@torch.no_grad()
def monitor_figures(model: DecompositionNet, dataset: Dataset, ref_abnormal: Tensor,
                    ref_lesion: Tensor, device: torch.device, batch_size: int = 32) -> dict:
    """Figures of every slice of ``dataset`` (real scans) against reference abnormal codes.

    Abnormal space: of a lesion slice's top-5 references, the share with a lesion; of a
    lesion-free slice's, the share without. Segmentation Dice per slice (TC, ED, ET, whole
    lesion), averaged over the slices where the prediction or the truth has the class; SSIM of
    the reconstruction inside the brain, averaged over slices.
    """
    model.eval()
    agree: dict[bool, list[float]] = {True: [], False: []}
    dice: dict[str, list[float | None]] = {name: [] for name in (*CLASS_NAMES, "whole")}
    ssim: list[float] = []
    predicted_lesion: list[bool] = []
    refs = ref_abnormal.double()
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([it["image"] for it in items]).to(device)
        truth = torch.stack([it["abnormal"] for it in items])
        drawn = model.draw(x)
        pred = drawn.logits.argmax(1).cpu()
        s = ssim_map(drawn.reconstruction.clamp(0, 1), x).cpu()
        brain = (x > 0)[..., _HALF:-_HALF, _HALF:-_HALF].cpu()
        d = torch.cdist(drawn.codes.abnormal.flatten(1).cpu().double(), refs)
        top = d.topk(min(TOP_K, len(refs)), largest=False).indices  # (B, k)
        for i, it in enumerate(items):
            lesion = bool((truth[i] > 0).any())
            agree[lesion].append(float((ref_lesion[top[i]] == lesion).double().mean()))
            if it["has_seg"]:
                for c, name in enumerate(CLASS_NAMES, start=1):
                    dice[name].append(_slice_dice(pred[i] == c, truth[i] == c))
                dice["whole"].append(_slice_dice(pred[i] > 0, truth[i] > 0))
            if brain[i].any():
                ssim.append(float(s[i][brain[i]].mean()))
            predicted_lesion.append(bool((pred[i] > 0).any()))
    return {
        "slices": len(dataset),
        "abn_lesion_at5": _mean(agree[True]),
        "abn_clean_at5": _mean(agree[False]),
        **{f"dice_{name}": _mean(values) for name, values in dice.items()},
        "rec_ssim_brain": _mean(ssim),
        "predicted_lesion_share": _mean([float(v) for v in predicted_lesion]),
    }


def _retrieval(normal_codes: list[Tensor], abnormal_codes: list[Tensor],
               twin_codes: list[Tensor], twin_of: list[int], pids: list[str],
               lesion_flags: list[bool]) -> dict:
    """Top-5 lesion precision in the abnormal space and twin overlap in the normal space."""
    out: dict = {"abn_lesion_at5": None, "abn_clean_at5": None, "normal_twin_at5": None}
    if len(set(pids)) < 2:
        return out  # every neighbour would be of the query's own patient
    normal, abnormal = torch.cat(normal_codes), torch.cat(abnormal_codes)
    top = _top_k_excluding_own(abnormal, pids, abnormal, pids, TOP_K)
    # Per query: the share of its neighbours whose lesion status matches the query's.
    agree = [sum(lesion_flags[j] == lesion_flags[i] for j in row) / len(row)
             for i, row in enumerate(top)]
    for key, status in (("abn_lesion_at5", True), ("abn_clean_at5", False)):
        values = [a for a, f in zip(agree, lesion_flags, strict=True) if f == status]
        out[key] = sum(values) / len(values) if values else None
    if twin_of:
        query = normal[twin_of]  # the lesion slices that have a twin
        query_pids = [pids[i] for i in twin_of]
        a = _top_k_excluding_own(query, query_pids, normal, pids, TOP_K)
        b = _top_k_excluding_own(torch.cat(twin_codes), query_pids, normal, pids, TOP_K)
        shared = [len(set(x) & set(y)) / TOP_K for x, y in zip(a, b, strict=True)]
        out["normal_twin_at5"] = sum(shared) / len(shared)
    return out


def score(metrics: dict) -> float:
    """The sum of ``SCORE_TERMS`` (a missing figure counts 0): higher is better, at most 7."""
    return round(sum(metrics.get(k) or 0.0 for k in SCORE_TERMS), 5)
