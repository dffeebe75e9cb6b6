"""`cbir bench model` and `cbir bench train`: every preset runs, whatever its model size."""

from __future__ import annotations

import pytest

from model.bench import encode_throughput, train_throughput


@pytest.mark.parametrize("name", ["cpu", "tiny"])
def test_encode_throughput_runs_for_presets_below_and_at_slice_size(name):
    r = encode_throughput(name, batch=2, repeats=1, warmup=0, device="cpu")
    assert r["preset"] == name and r["bare_slices_per_s"] > 0 and r["encode_slices_per_s"] > 0


def test_train_throughput_times_every_variant():
    r = train_throughput("cpu", batch=2, repeats=1, warmup=0, device="cpu")
    assert set(r["variants"]) == {"plain", "+ bf16", "+ null_shortcut", "+ separable_ssim",
                                  "+ channels_last", "all four"}
    assert all(v > 0 for v in r["variants"].values())
