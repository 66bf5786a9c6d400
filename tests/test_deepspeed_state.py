"""engine=deepspeed checkpoints hold the full optimizer state in the native engine's layout.

At ZeRO 1-2 DeepSpeed keeps Adam's moments in flat fp32 partitions (one per group and rank,
one ``step`` per partition) and steps its own fp32 copy of the weights; at every stage it
orders and splits the optimizer groups its own way. The checkpoint holds what the native
engine's ``optimizer.state_dict()`` would hold for the same model: per parameter, full
shape, every expert by global id. So a DeepSpeed run resumes exactly (model, moments, step,
LR schedule), and either engine resumes the other's run at any ep_size.

Models with experts whose weights and moments all differ (a mix-up of ids shows), trained
with Adam at two learning rates (experts and gate: a mix-up of groups shows) that decay during
the run. DeepSpeed's import and process start are the expensive part: one two-process launch
(ZeRO 0, 1 and 2, and reloads at another layout) and, marked slow, one preemption scenario.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from moe_dist.config import load_config
from moe_dist.train.build import build_trainer
from moe_dist.train.checkpoint import load_checkpoint
from moe_dist.train.preemption import PREEMPTED_EXIT_CODE
from procs import free_port, spawn
from test_preemption import assert_preempted_mid_epoch, finish, rank_env, start, train_command, wait_for_epoch
from test_preemption import overrides as preemption_overrides

pytest.importorskip("deepspeed")

E = 4  # experts of the MNIST MoE below
ZERO_STAGES = (0, 1, 2)
RELOAD_STAGES = (0, 1)  # ZeRO 2 reads and writes the state as ZeRO 1 does; the preemption test loads it


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def mnist_overrides(run_dir: Path, root: str, *extra: str) -> list[str]:
    """A dense MoE of 4 CNN experts on 300 real MNIST images, 3 steps per epoch, Adam with the
    experts and the gate at different learning rates, both halved after every epoch. Dense
    routing keeps one process and two ranks within rounding of each other (top-1 routing
    and Adam's first, sign-like steps would turn rounding into different runs)."""
    return [f"run_dir={run_dir}", "data.name=mnist10k", f"data.root={root}", "data.train_size=300",
            "data.test_size=100", "model.arch=mnist", "moe.num_experts=4", "moe.routing=dense",
            "loss.importance_weight=0.1", "loss.ls_beta=1.0", "loss.ls_gamma=0.5", "train.optimizer=adam",
            "train.batch_size=100", "train.eval_batch_size=100", "train.epochs=2", "train.lr=3e-3",
            "train.gate_lr=1e-2", "train.lr_decay_every=1", "train.lr_decay_factor=2", "train.eval_every=1",
            "train.progress=false", "train.num_threads=1", *extra]


def deepspeed(ep_size: int, stage: int) -> list[str]:
    return ["engine=deepspeed", f"parallel.ep_size={ep_size}", f"parallel.zero_stage={stage}"]


# ----------------------------------------------------------------------------- one launch


def save_and_reload_worker(rank: int, world: int, out_dir: str, root: str, native_checkpoint: str) -> None:
    """ZeRO 0, 1 and 2 runs at ep_size 2 (each rank 2 of the 4 experts); then a native
    single-process checkpoint loaded at ep_size 1 under ZeRO 0 and 1 (there each expert
    tensor's moments are split across the two ranks' partitions) and saved again without a
    step."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(out_dir) / "torch_extensions")
    from deepspeed.utils import safe_get_full_fp32_param

    from moe_dist.parallel.deepspeed_engine import import_deepspeed

    import_deepspeed().init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for stage in ZERO_STAGES:
        run_dir = Path(out_dir) / f"zero{stage}"
        build_trainer(load_config(None, mnist_overrides(run_dir, root, *deepspeed(2, stage)))).fit()
    payload = torch.load(native_checkpoint, weights_only=True)
    for stage in RELOAD_STAGES:
        trainer = build_trainer(load_config(None, mnist_overrides(Path(out_dir) / f"reload{stage}", root,
                                                                  *deepspeed(1, stage))))
        trainer.load_model_state(payload["model"])
        trainer.engine.load_optimizer_state(payload["optimizer"])
        trainer.engine.load_scheduler_state(trainer.scheduler, payload["scheduler"])
        # ZeRO steps its own fp32 copy of the weights: it must hold the loaded ones
        # (a list, not a generator: every rank takes part in every parameter's all-reduce)
        masters = stage == 0 or all([torch.equal(safe_get_full_fp32_param(p), p.detach())
                                     for p in trainer.model.parameters()])
        saved = {"model": trainer.engine.model_state(), "optimizer": trainer.engine.optimizer_state(),
                 "scheduler": trainer.engine.scheduler_state(trainer.scheduler), "masters_are_the_weights": masters}
        torch.save(saved, Path(out_dir) / f"reload{stage}_rank{rank}.pt")


def assert_same_layout(ours: dict, native: dict) -> None:
    """Group names, parameter ids and hyperparameters (the decayed LRs), state keys in
    order and Adam's steps: exactly the native engine's."""
    assert ours["param_groups"] == native["param_groups"]
    assert list(ours["state"]) == list(native["state"])
    for idx, entry in native["state"].items():
        assert list(ours["state"][idx]) == list(entry), idx
        assert torch.equal(ours["state"][idx]["step"], entry["step"]), idx


def per_expert(payload: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model and Adam moments, expert tensors (E along dim 0)
    split into one tensor per expert."""
    [experts] = [g["params"] for g in payload["optimizer"]["param_groups"] if g["name"] == "experts"]
    tensors = [(f"model {k}", v, k.startswith("experts.")) for k, v in payload["model"].items()]
    for idx, entry in payload["optimizer"]["state"].items():
        tensors += [(f"{key} of parameter {idx}", entry[key], idx in experts) for key in ("exp_avg", "exp_avg_sq")]
    out = {}
    for name, value, is_expert in tensors:
        out.update({f"{name} [{e}]": v for e, v in (enumerate(value) if is_expert else [("all", value)])})
    return out


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's largest difference relative to the largest magnitude of ``b``'s."""
    assert a.keys() == b.keys()
    return {k: ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b}


def assert_close_per_expert(ours: dict, native: dict, rtol: float) -> None:
    """Each expert's weights and moments within ``rtol`` of the native ones'."""
    worst = relative_differences(per_expert(ours), per_expert(native))
    assert max(worst.values()) <= rtol, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def assert_experts_differ(payload: dict, by_more_than: float) -> None:
    """Any two experts' weights and moments differ by far more than the tolerances here, so
    an expert that came back under another id cannot pass."""
    tensors = per_expert(payload)
    for name in [k for k in tensors if k.endswith(" [0]")]:
        rows = [tensors[f"{name[:-4]} [{e}]"] for e in range(E)]
        for i in range(E):
            for j in range(i + 1, E):
                assert relative_differences({"x": rows[i]}, {"x": rows[j]})["x"] > by_more_than, (name, i, j)


@pytest.mark.multiprocess
def test_deepspeed_checkpoints_hold_the_native_optimizer_state(tmp_path, data_root):
    """ZeRO 0, 1 and 2 at two ranks, ep_size 2, save Adam's full state as one native
    process does after the same steps; a native checkpoint loaded at ep_size 1 under ZeRO 0
    and 1 saves back bit for bit on both ranks (ZeRO's fp32 weights equal to the loaded
    ones); and a DeepSpeed checkpoint resumes under the native engine in one process,
    continuing the native trajectory."""
    native = tmp_path / "native"
    reference = build_trainer(load_config(None, mnist_overrides(native, data_root, "train.epochs=3"))).fit()
    native_epoch2 = native / "checkpoints" / "epoch_0002.pt"
    spawn(save_and_reload_worker, 2, str(tmp_path), data_root, str(native_epoch2))
    expected = torch.load(native_epoch2, weights_only=True)
    assert_experts_differ(expected, 1e-2)  # ten times the tolerance below
    for stage in ZERO_STAGES:
        ours = load_checkpoint(tmp_path / f"zero{stage}" / "checkpoints")
        assert_same_layout(ours["optimizer"], expected["optimizer"])
        assert ours["scheduler"] == expected["scheduler"]
        # Adam turns rounding-level gradient differences into lr-sized steps where a gradient
        # element is near zero (test_parallel.PARAM_TOL); the gate at lr 1e-2 shows it most
        assert_close_per_expert(ours, expected, 1e-3)
    for stage, rank in ((stage, rank) for stage in RELOAD_STAGES for rank in (0, 1)):
        reloaded = torch.load(tmp_path / f"reload{stage}_rank{rank}.pt", weights_only=True)
        assert reloaded["masters_are_the_weights"]
        assert reloaded["scheduler"] == expected["scheduler"]
        assert_same_layout(reloaded["optimizer"], expected["optimizer"])
        tensors = per_expert(reloaded)
        for name, value in per_expert(expected).items():
            assert torch.equal(tensors[name], value), name

    # DeepSpeed (2 ranks, ep_size 2, ZeRO 2) -> the native engine in one process: engine,
    # ZeRO stage and ep_size may change on resume
    zero2 = tmp_path / "zero2"
    resumed = build_trainer(load_config(None, mnist_overrides(zero2, data_root, "train.epochs=3"))).fit()
    assert resumed["engine"] == "moe_dist" and resumed["num_processes"] == 1
    assert len(resumed["history"]) == len(reference["history"]) == 3
    for ours, native_epoch in zip(resumed["history"], reference["history"]):
        assert ours["train_loss"] == pytest.approx(native_epoch["train_loss"], rel=1e-5)
        assert ours["test_error"] == native_epoch["test_error"]
    final, native_final = load_checkpoint(zero2 / "checkpoints"), load_checkpoint(native / "checkpoints")
    assert_same_layout(final["optimizer"], native_final["optimizer"])
    assert_close_per_expert(final, native_final, 1e-3)


# ----------------------------------------------------------------------------- preemption


@pytest.mark.slow  # three two-process DeepSpeed launches: 60-90 s on 2 cores shared with other jobs
@pytest.mark.multiprocess
def test_preempted_deepspeed_run_ends_like_an_uninterrupted_one(tmp_path):
    """Two ranks, ep_size 2, ZeRO 2, Adam with a decaying LR on Chen's synthetic MoE (top-1:
    any difference in the resumed state grows); SIGUSR1 reaches rank 1 mid-epoch, as the
    SLURM scripts send it: both ranks exit 75 with a mid-epoch checkpoint; the same two
    commands resume and end with the uninterrupted run's weights, Adam moments, steps, LRs
    and history."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}

    def launch(run_dir: Path) -> list:
        args = preemption_overrides(run_dir, "train.optimizer=adam", "train.epochs=8", "train.lr_decay_every=3",
                                    *deepspeed(2, 2))
        cmd, port = train_command(args), free_port()
        return [start(cmd, **rank_env(rank, 2, port), **env) for rank in (0, 1)]

    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    for code, out in finish(launch(straight), timeout=300):
        assert code == 0, out[-3000:]
    procs = launch(preempted)
    wait_for_epoch(preempted, procs)
    procs[1].send_signal(signal.SIGUSR1)
    for code, out in finish(procs, timeout=300):
        assert code == PREEMPTED_EXIT_CODE, out[-3000:]
    state = assert_preempted_mid_epoch(preempted)
    assert state["epoch"] < 8
    for code, out in finish(launch(preempted), timeout=300):
        assert code == 0, out[-3000:]
    a, b = load_checkpoint(preempted / "checkpoints"), load_checkpoint(straight / "checkpoints")
    assert max(relative_differences(a["model"], b["model"]).values()) <= 1e-6
    assert_same_layout(a["optimizer"], b["optimizer"])
    assert a["scheduler"] == b["scheduler"]
    assert max(relative_differences(per_expert(a), per_expert(b)).values()) <= 1e-6
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (preempted, straight))
    strip = lambda hist: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in hist]  # noqa: E731
    assert strip(ma["history"]) == strip(mb["history"])
