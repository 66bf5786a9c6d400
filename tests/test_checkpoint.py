import json
import os

import pytest
import torch

from moe_dist.errors import CheckpointError
from moe_dist.train import checkpoint as ckpt


def payload(value: float) -> dict:
    return {"model": {"w": torch.full((3, 4), value)}, "state": json.dumps({"epoch": int(value)})}


def test_roundtrip_and_pruning(tmp_path):
    for epoch in range(1, 5):
        ckpt.save_checkpoint(tmp_path, epoch, payload(epoch), keep=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]
    loaded = ckpt.load_checkpoint(tmp_path)
    assert torch.equal(loaded["model"]["w"], torch.full((3, 4), 4.0))
    assert ckpt.load_checkpoint(tmp_path / "none") is None


def test_tampered_checkpoint_is_rejected_before_unpickling(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path, 1, payload(1))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled a tampered file"))
    with pytest.raises(CheckpointError, match="epoch_0001.pt is corrupt or was modified"):
        ckpt.load_checkpoint(tmp_path)


def test_truncated_checkpoint_is_rejected(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, payload(1))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(tmp_path)


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, payload(1))
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("epoch_0002.pt"):
            raise KeyboardInterrupt("killed mid-save")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, payload(2))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"
    assert torch.equal(ckpt.load_checkpoint(tmp_path)["model"]["w"], torch.full((3, 4), 1.0))


def test_checkpoint_holds_only_weights_only_types(tmp_path):
    """weights_only=True must be able to load what we save (no custom classes)."""
    path = ckpt.save_checkpoint(tmp_path, 1, {**payload(1), "rng": torch.get_rng_state()})
    torch.load(path, weights_only=True)
