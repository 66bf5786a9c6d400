"""The CUDA path: device placement, resumption and bf16 autocast on a GPU.

Skipped where torch sees no CUDA device (CI); run on a GPU machine with
``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, tiny_mnist
from moe_dist.config import load_config
from moe_dist.train.checkpoint import load_checkpoint
from moe_dist.train.build import build_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MNIST_VANILLA = CONFIGS / "mnist" / "vanilla.yaml"


def train(run_dir, root, *extra):
    return build_trainer(load_config(MNIST_VANILLA, tiny_mnist(run_dir, root, "train.device=cuda", *extra))).fit()


def test_training_runs_on_the_gpu(tmp_path, data_root):
    cfg = load_config(MNIST_VANILLA, tiny_mnist(tmp_path / "run", data_root, "train.device=cuda"))
    trainer = build_trainer(cfg)
    assert trainer.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    result = trainer.fit()
    assert result["hardware"] == torch.cuda.get_device_name(trainer.device)
    assert result["peak_memory_mb"] > 0
    # the same seed on the CPU follows the same curve (kernels differ only in rounding)
    cpu = build_trainer(load_config(MNIST_VANILLA, tiny_mnist(tmp_path / "cpu", data_root, "train.device=cpu"))).fit()
    assert len(result["history"]) == len(cpu["history"]) == 3
    for a, b in zip(result["history"], cpu["history"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-2 * a["train_loss"], (a, b)
    assert abs(result["test_error"] - cpu["test_error"]) <= 0.01


def test_interrupted_run_resumes_bit_identically_on_the_gpu(tmp_path, data_root):
    # The checkpoint's RNG states are CPU tensors; resuming on CUDA must restore them as such.
    # GPU kernels with atomics (convolution backward, scatter-add) differ run to run unless
    # deterministic algorithms are asked for.
    train(tmp_path / "straight", data_root, "train.deterministic=true")
    train(tmp_path / "resumed", data_root, "train.deterministic=true", "train.epochs=1")
    train(tmp_path / "resumed", data_root, "train.deterministic=true")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bf16_keeps_the_gate_in_float32_and_tracks_fp32(tmp_path, data_root):
    fp32 = train(tmp_path / "fp32", data_root, "train.epochs=3")
    cfg = load_config(MNIST_VANILLA, tiny_mnist(tmp_path / "bf16", data_root, "train.device=cuda",
                                                "train.mixed_precision=bf16", "train.epochs=3"))
    trainer = build_trainer(cfg)
    x = trainer.data.train.x[:64]
    with trainer.engine.autocast():
        out = trainer.engine(x)
    assert out.gate_probs.dtype == torch.float32
    assert out.output.dtype == torch.float32
    bf16 = trainer.fit()
    assert len(fp32["history"]) == len(bf16["history"]) == 3
    for a, b in zip(fp32["history"], bf16["history"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * abs(a["train_loss"]) + 0.02


@pytest.mark.parametrize("config", ["fmnist/vanilla.yaml", "synthetic/s1_moe_nonlinear.yaml"])
def test_a_stack_on_the_gpu_follows_separate_gpu_runs(tmp_path, data_root, config):
    """The CUDA default of stacked runs (vmapped gates, one R*E expert bank, each member's
    noise from its own CUDA generator) against the same runs alone on the GPU."""
    from moe_dist.train.stacked import build_stacked_trainer

    def overrides(name: str, seed: int) -> list[str]:
        data = tiny_mnist(tmp_path / name, data_root) if config.startswith("fmnist") else [
            f"run_dir={tmp_path / name}", "data.train_size=400", "data.test_size=200", "train.epochs=3",
            "train.progress=false"]
        return [*data, "train.device=cuda", f"seed={seed}"]
    alone = [build_trainer(load_config(CONFIGS / config, overrides(f"a{s}", s))).fit() for s in (0, 1)]
    stacked = build_stacked_trainer([load_config(CONFIGS / config, overrides(f"s{s}", s)) for s in (0, 1)]).fit()
    for a, s in zip(alone, stacked):
        for x, y in zip(a["history"], s["history"]):
            assert abs(x["train_loss"] - y["train_loss"]) <= 1e-4 * abs(x["train_loss"]), (x, y)
        assert abs(a["test_error"] - s["test_error"]) <= 0.011
