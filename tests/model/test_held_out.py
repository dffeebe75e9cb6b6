"""Held-out retrieval figures on hand-built codes with known answers."""

from __future__ import annotations

import torch

from model.held_out import SCORE_TERMS, _retrieval, _top_k_excluding_own, score


def test_top_k_never_returns_the_querys_own_patient():
    codes = torch.tensor([[0.0], [0.1], [5.0], [5.1], [9.0]])
    pids = ["A", "A", "B", "B", "C"]
    top = _top_k_excluding_own(codes, pids, codes, pids, k=2)
    assert top[0] == [2, 3]  # A's nearest others are B's, not A's own 0.1
    assert top[4] == [3, 2]
    assert _top_k_excluding_own(codes, pids, codes, pids, k=5)[0] == [2, 3, 4]  # only 3 others


def test_lesion_precision_and_twin_overlap_by_hand():
    # Six slices of three patients; the abnormal code is 10 for a lesion, 0 without.
    pids = ["A", "A", "B", "B", "C", "C"]
    lesion = [True, False, True, False, True, False]
    abnormal = [torch.tensor([[10.0], [0.0]]), torch.tensor([[10.1], [0.1]]),
                torch.tensor([[9.9], [0.2]])]
    normal = [torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]]),
              torch.tensor([[4.0], [5.0]])]
    # Lesion slices 0, 2, 4 have twins; slice 0's twin code equals its own code, slice 2's
    # twin sits elsewhere, slice 4's equals its own.
    twins = [torch.tensor([[0.0]]), torch.tensor([[100.0]]), torch.tensor([[4.0]])]
    out = _retrieval(normal, abnormal, twins, [0, 2, 4], pids, lesion)
    # k = 5 but each query sees only 4 other-patient slices: 2 with a lesion, 2 without.
    assert out["abn_lesion_at5"] == 0.5 and out["abn_clean_at5"] == 0.5
    # Slices 0 and 4: identical top lists (4 of 4 shared -> 4/5); slice 2: the twin at 100
    # ranks the same 4 others (all there are), so it shares 4 of 5 as well.
    assert abs(out["normal_twin_at5"] - 0.8) < 1e-9


def test_retrieval_needs_two_patients_and_score_adds_its_terms():
    one = _retrieval([torch.zeros(2, 1)], [torch.zeros(2, 1)], [], [], ["A", "A"],
                     [True, False])
    assert set(one.values()) == {None}
    metrics = dict.fromkeys(SCORE_TERMS, 0.5) | {"dice_TC": 0.9, "pn_ssim_out": None}
    assert score(metrics) == 0.5 * (len(SCORE_TERMS) - 1)


def test_monitor_figures_on_a_hand_made_cohort():
    """The per-slice figures of a monitored cohort, against reference codes with known status."""
    from model.config import preset
    from model.held_out import monitor_figures
    from model.network import DecompositionNet

    torch.manual_seed(0)
    net = DecompositionNet(preset("tiny")).eval()
    items = []
    for i in range(4):
        image = torch.zeros(1, 256, 256)
        image[:, 60:200, 60:200] = 0.5
        abnormal = torch.zeros(256, 256, dtype=torch.long)
        if i < 2:
            abnormal[100:120, 100:120] = 3
        items.append({"image": image, "abnormal": abnormal, "has_seg": True})
    with torch.no_grad():
        codes = net.encode(torch.stack([it["image"] for it in items])).abnormal.flatten(1)
    # References: each slice's own code, labelled with its own status, so every top-1 agrees.
    refs = codes.repeat(5, 1)
    flags = torch.tensor([True, True, False, False] * 5)
    out = monitor_figures(net, items, refs, flags, torch.device("cpu"))
    assert out["slices"] == 4
    # The four slices have identical images, so their codes are identical: every query's five
    # nearest references are ties of all four statuses; precision is the share of that status.
    assert 0.0 <= out["abn_lesion_at5"] <= 1.0 and 0.0 <= out["abn_clean_at5"] <= 1.0
    assert abs(out["abn_lesion_at5"] + out["abn_clean_at5"] - 1.0) < 1e-9
    assert 0.0 <= out["rec_ssim_brain"] <= 1.0
    # An untrained net's segmentation: Dice is defined (truth has ET) for the lesion slices.
    assert out["dice_ET"] is not None and out["dice_whole"] is not None
