"""Checkpoints: bit-identical round trip, and a clear error for every bad file."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from model.config import preset
from model.network import DecompositionNet


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = DecompositionNet(preset("tiny"))
    # A few training-mode passes so BatchNorm statistics and EMA codebooks are not at init.
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand(4, 1, 256, 256))
    return net.eval()


def test_round_trip_gives_bit_identical_outputs(model, tmp_path):
    path = tmp_path / "m.pt"
    sha = save_checkpoint(path, model, "tiny", extra={"epoch": 3})
    loaded, payload = load_model(path)
    assert payload["weights_sha256"] == sha and payload["epoch"] == 3
    assert payload["preset"] == "tiny" and payload["config"] == model.config.to_dict()
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        a, b = model(x), loaded(x)
        assert torch.equal(a.reconstruction, b.reconstruction)
        assert torch.equal(a.pseudo_normal, b.pseudo_normal)
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(a.normal.indices, b.normal.indices)
        assert torch.equal(a.abnormal.indices, b.abnormal.indices)
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        read_checkpoint(tmp_path / "none.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable checkpoint"):
        read_checkpoint(path)


def test_truncated_file(model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "tiny")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(path)


def test_tampered_weights_are_caught(model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "tiny")
    payload = torch.load(path, weights_only=True)
    name = next(k for k in payload["model"] if k.endswith("weight"))
    payload["model"][name] = payload["model"][name] + 1e-3
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not match their recorded sha256"):
        read_checkpoint(path)


def test_other_torch_file_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a compositional-cbir checkpoint"):
        read_checkpoint(path)


def test_other_preprocessing_version_is_refused(model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "tiny")
    payload = torch.load(path, weights_only=True)
    payload["preprocessing_version"] = 999
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="preprocessing version 999"):
        read_checkpoint(path)


def test_export_drops_the_optimizer_and_keeps_the_weights(model, tmp_path):
    from model.checkpoint import export_checkpoint

    src, dst = tmp_path / "train.pt", tmp_path / "ship.pt"
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 256, 256)).reconstruction.mean().backward()
    optimizer.step()
    model.eval()
    sha = save_checkpoint(src, model, "tiny", extra={"optimizer": optimizer.state_dict(),
                                                     "epoch": 3})
    export_checkpoint(src, dst, note="synthetic")
    shipped = read_checkpoint(dst)
    assert "optimizer" not in shipped and shipped["epoch"] == 3 and shipped["note"] == "synthetic"
    assert shipped["weights_sha256"] == sha
    assert dst.stat().st_size < src.stat().st_size
    loaded, _ = load_model(dst)
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        assert torch.equal(loaded.pseudo_normal(x), model.pseudo_normal(x))


def test_a_soup_is_the_mean_of_its_ingredients(model, tmp_path):
    """Floating tensors averaged, counters kept from the first; run records dropped, the
    ingredients recorded; the soup loads and is a checkpoint like any other."""
    from model.checkpoint import average_checkpoints

    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(first, model, "tiny", extra={"step": 7, "train_config": {"lr": 1e-4},
                                                "optimizer": {}, "metrics": {"x": 1}})
    other = DecompositionNet(model.config)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.normal_quantizer.initialized.fill_(False)
    save_checkpoint(second, other, "tiny")
    soup = average_checkpoints([first, second], tmp_path / "soup.pt")
    a, b = read_checkpoint(first)["model"], read_checkpoint(second)["model"]
    back = read_checkpoint(tmp_path / "soup.pt")
    for name, tensor in back["model"].items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (a[name] + b[name]) / 2)
        else:
            assert torch.equal(tensor, a[name]), name
    assert back["weights_sha256"] == soup["weights_sha256"]
    assert back["train_config"] == {"lr": 1e-4}
    assert not {"step", "optimizer", "metrics"} & set(back)
    assert [s["file"] for s in back["soup_of"]] == ["a.pt", "b.pt"]
    load_model(tmp_path / "soup.pt")


def test_a_soup_refuses_other_models_and_a_single_checkpoint(model, tmp_path):
    from model.checkpoint import average_checkpoints

    save_checkpoint(tmp_path / "a.pt", model, "tiny")
    with pytest.raises(CheckpointError, match="two checkpoints or more"):
        average_checkpoints([tmp_path / "a.pt"], tmp_path / "soup.pt")
    bigger = DecompositionNet(preset("small"))
    save_checkpoint(tmp_path / "b.pt", bigger, "small")
    with pytest.raises(CheckpointError, match="another model than a.pt"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "soup.pt")
    assert not (tmp_path / "soup.pt").exists()
