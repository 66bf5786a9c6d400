"""Stacked runs (moe_dist.models.stack, moe_dist.train.stacked): a stack of members equals the
same runs trained one by one.

* One step, model level, in float64 (in float32 the stack's other summation order alone is
  about 1e-6 of a gradient): identical initial parameters, first-step losses and every
  gradient within 1e-6 relative, and the BatchNorm running statistics, for dense, top-k with Gaussian
  and uniform noise, attentive routing and single models, members whose seeds, L_cv and L_s
  weights and noise scales differ; the Fashion-MNIST (BatchNorm), CIFAR-100 (BatchNorm in
  gate and experts) and Chen et al. architectures; gates looped and vmapped.
* Training: 2-epoch histories of stacks against separate runs within 1e-4 relative
  (Fashion-MNIST with L_cv/L_s/learning rates that differ, Chen et al.'s top-k with noise at
  training and test time, the CIFAR-100 single model with augmentation); a stack preempted
  mid-epoch resumes to the uninterrupted parameters; a member whose loss turns NaN stops
  and the others are unaffected.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from moe_dist.config import load_config
from moe_dist.errors import ConfigError
from moe_dist.losses import model_loss
from moe_dist.models import build_model
from moe_dist.models.stack import stack_models
from moe_dist.rundir import RunDir
from moe_dist.train.build import build_trainer
from moe_dist.train.preemption import Preempted
from moe_dist.train.stacked import build_stacked_trainer, stack_groups

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SHAPES = {"mnist": ((1, 28, 28), 10), "fmnist": ((1, 28, 28), 10), "cifar100": ((3, 32, 32), 100),
          "patch_cnn": ((1, 1000), 2)}
# Parameters whose true gradient is zero (a bias right before a BatchNorm): only rounding
# noise is left of them, which no layout reproduces.
ZERO_GRADIENT = ("gate.conv.bias",)

# (config, overrides of every member, [each member's own overrides])
ONE_STEP_CASES = {
    "fmnist-dense": ("fmnist/vanilla.yaml", [],
                     [["seed=0"], ["seed=1", "loss.importance_weight=0.5"], ["seed=2", "loss.ls_beta=1e-5",
                                                                                "loss.ls_gamma=1e-6"]]),
    "fmnist-topk-gaussian": ("fmnist/vanilla.yaml", ["moe.routing=topk", "moe.top_k=2", "moe.noise=gaussian"],
                             [["seed=0"], ["seed=1", "moe.noise_std=0.3", "loss.importance_weight=0.2"]]),
    "fmnist-attentive": ("fmnist/attentive.yaml", [], [["seed=3"], ["seed=4", "loss.importance_weight=0.5"]]),
    "fmnist-single": ("fmnist/single.yaml", [], [["seed=0"], ["seed=1"]]),
    "mnist-dense": ("mnist/vanilla.yaml", [], [["seed=0"], ["seed=1", "loss.ls_beta=1e-4"]]),
    "cifar-dense": ("cifar100/vanilla.yaml", ["moe.num_experts=3"], [["seed=0"], ["seed=1", "loss.importance_weight=0.3"]]),
    "cifar-topk": ("cifar100/vanilla.yaml", ["moe.num_experts=3", "moe.routing=topk", "moe.top_k=2"],
                   [["seed=0"], ["seed=1"]]),
    "cifar-single": ("cifar100/single.yaml", [], [["seed=0"], ["seed=1"]]),
    "chen-topk-uniform": ("synthetic/s1_moe_nonlinear.yaml", [], [["seed=0"], ["seed=1"], ["seed=2"]]),
}


def _members(case: str):
    config, common, own = ONE_STEP_CASES[case]
    cfgs = [load_config(CONFIGS / config, [*common, *o]) for o in own]
    shape, classes = SHAPES[cfgs[0].model.arch]
    models, generators = [], []
    for cfg in cfgs:  # as moe_dist.train.build.build_network and build_stacked_trainer do
        torch.manual_seed(cfg.seed)
        models.append(build_model(cfg.model, cfg.moe, cfg.loss, classes, shape).double())
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        generators.append(generator)
    return cfgs, models, generators, shape, classes


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# every case with looped gates; the BatchNorm gates vmapped too
ONE_STEP_RUNS = [(case, "loop") for case in ONE_STEP_CASES] + [
    (case, "vmap") for case in ("fmnist-dense", "fmnist-attentive", "cifar-dense")]


@pytest.mark.parametrize("case, mode", ONE_STEP_RUNS)
def test_one_stacked_step_equals_separate_steps(case, mode):
    cfgs, models, generators, shape, classes = _members(case)
    separate = [copy.deepcopy(m) for m in models]
    rng_after_init = [g.get_state() for g in generators]
    stack = stack_models(models, generators, mode)
    for stacked, alone in zip(models, separate):  # sharing storage keeps the initial values
        for (name, a), (_, b) in zip(stacked.state_dict().items(), alone.state_dict().items()):
            assert torch.equal(a, b), name
    torch.manual_seed(100)
    rows = 8 if case.startswith("cifar") else 16
    x = torch.randn(len(models), rows, *shape, dtype=torch.float64)
    y = torch.randint(0, classes, (len(models), rows))
    stack.train()
    out = stack(x.flatten(0, 1))
    losses = [model_loss(stack.member_output(out, r), y[r], cfg.loss.kind)[0] for r, cfg in enumerate(cfgs)]
    torch.stack(losses).sum().backward()
    stack.share_gradients()
    for r, (cfg, stacked, alone) in enumerate(zip(cfgs, models, separate)):
        torch.set_rng_state(rng_after_init[r])  # the noise a run alone draws
        alone.train()
        loss, _ = model_loss(alone(x[r]), y[r], cfg.loss.kind)
        loss.backward()
        assert abs(float(losses[r].detach()) - float(loss.detach())) <= 1e-6 * abs(float(loss.detach())), (r, float(losses[r].detach()), float(loss.detach()))
        for (name, a), (_, b) in zip(stacked.named_parameters(), alone.named_parameters()):
            if name in ZERO_GRADIENT:
                continue
            assert (a.grad is None) == (b.grad is None), name
            if b.grad is not None and b.grad.norm() > 0:
                assert _relative(a.grad, b.grad) <= 1e-6, (r, name, _relative(a.grad, b.grad))
        for (name, a), (_, b) in zip(stacked.named_buffers(), alone.named_buffers()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), (r, name)


# ----------------------------------------------------------------------------- training


def _overrides(run_dir: Path, root: str, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", "data.name=mnist10k", f"data.root={root}", "data.train_size=300",
            "data.test_size=100", "train.epochs=2", "train.batch_size=100", "train.progress=false",
            "train.num_threads=1", *extra]


def _assert_histories_match(alone: dict, stacked: dict, tol: float = 1e-4, only_losses: bool = False) -> None:
    """Every float of every epoch's record within ``tol`` relative (``only_losses``: the
    training loss parts and the test loss; the routing metrics count argmax choices, which
    float rounding flips where the gate is still near-uniform)."""
    assert len(alone["history"]) == len(stacked["history"])
    for a, b in zip(alone["history"], stacked["history"]):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key == "epoch_seconds" or not isinstance(value, float):
                continue
            if only_losses and not (key.startswith("train_") and key != "train_error" or key == "test_loss"):
                continue
            assert abs(value - b[key]) <= tol * max(abs(value), 1e-3), (key, value, b[key])
    assert alone["test_error"] == pytest.approx(stacked["test_error"], abs=0.011)


def _train_both(tmp_path: Path, config: Path, members: list[list[str]], mode: str | None = None):
    alone = [build_trainer(load_config(config, [*o, f"run_dir={tmp_path}/alone{i}"])).fit()
             for i, o in enumerate(members)]
    cfgs = [load_config(config, [*o, f"run_dir={tmp_path}/stacked{i}"]) for i, o in enumerate(members)]
    return alone, build_stacked_trainer(cfgs, mode=mode).fit()


def test_stacked_fmnist_runs_follow_separate_runs(tmp_path, data_root):
    """configs/fmnist/vanilla.yaml (BatchNorm gate), three members differing in seed, L_cv
    weight, L_s weights and learning rate."""
    base = _overrides(tmp_path, data_root)
    members = [[*base, "seed=0"], [*base, "seed=1", "loss.importance_weight=0.3", "train.lr=0.002"],
               [*base, "seed=2", "loss.ls_beta=1e-6", "loss.ls_gamma=1e-7"]]
    alone, stacked = _train_both(tmp_path, CONFIGS / "fmnist" / "vanilla.yaml", members)
    for a, s in zip(alone, stacked):
        _assert_histories_match(a, s)
        assert s["stack_members"] == 3
    assert "train_importance" in stacked[1]["history"][0] and "train_importance" not in stacked[0]["history"][0]
    for i in range(3):  # the saved weights: those of the run alone
        a, s = (RunDir(tmp_path / f"{kind}{i}").latest_weights() for kind in ("alone", "stacked"))
        # Adam turns the rounding noise of the zero gradient into lr-sized steps of that bias,
        # and the BatchNorm's running mean right after it carries them
        for key in set(a) - {*ZERO_GRADIENT, "gate.bn.running_mean"}:
            assert _relative(s[key].double(), a[key].double()) <= 1e-4, key


def test_vmapped_stack_follows_separate_runs(tmp_path, data_root):
    """The CUDA default (gates in one vmap, dense experts as one R*E bank), run on the CPU:
    configs/fmnist/attentive.yaml, members differing in seed and L_cv weight."""
    base = _overrides(tmp_path, data_root)
    members = [[*base, "seed=0"], [*base, "seed=1", "loss.importance_weight=0.3"]]
    alone, stacked = _train_both(tmp_path, CONFIGS / "fmnist" / "attentive.yaml", members, mode="vmap")
    for a, s in zip(alone, stacked):
        _assert_histories_match(a, s, only_losses=True)


def test_stacked_chen_topk_with_noise_follows_separate_runs(tmp_path):
    """Chen et al.'s top-1 MoE with uniform router noise in training and evaluation."""
    base = ["data.train_size=400", "data.test_size=200", "train.epochs=3", "train.progress=false",
            "train.num_threads=1"]
    members = [[*base, "seed=0"], [*base, "seed=1"]]
    alone, stacked = _train_both(tmp_path, CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml", members)
    for a, s in zip(alone, stacked):
        _assert_histories_match(a, s)
        assert a["dispatch_entropy"] == pytest.approx(s["dispatch_entropy"], rel=1e-4)


def test_stacked_cifar_single_models_follow_separate_runs(tmp_path):
    """configs/cifar100/single.yaml: BatchNorm and each member's own crops and flips."""
    from moe_dist.data import write_cifar100_fixture

    write_cifar100_fixture(tmp_path / "data", n_train=40, n_test=12, seed=3)
    base = [f"data.root={tmp_path / 'data'}", "train.epochs=2", "train.batch_size=20", "train.eval_batch_size=12",
            "train.progress=false", "train.num_threads=1"]
    alone, stacked = _train_both(tmp_path, CONFIGS / "cifar100" / "single.yaml",
                                 [[*base, "seed=0"], [*base, "seed=5", "train.lr=0.0005"]])
    for a, s in zip(alone, stacked):
        _assert_histories_match(a, s)


def test_preempted_stack_resumes_to_the_uninterrupted_weights(tmp_path, data_root, monkeypatch):
    config = CONFIGS / "fmnist" / "vanilla.yaml"

    def cfgs(name: str):
        return [load_config(config, _overrides(tmp_path / name / f"s{s}", data_root, f"seed={s}")) for s in (0, 1)]
    build_stacked_trainer(cfgs("whole")).fit()
    trainer = build_stacked_trainer(cfgs("cut"))
    calls = {"n": 0}

    def signal_at_step_4(distributed, device):  # SIGUSR1 (10) seen after the 4th step
        calls["n"] += 1
        trainer.preemption.agreed_signum = 10 if calls["n"] == 4 else 0
        return trainer.preemption.agreed_signum
    monkeypatch.setattr(trainer.preemption, "agreed", signal_at_step_4)
    with pytest.raises(Preempted):
        trainer.fit()
    assert not RunDir(tmp_path / "cut" / "s0").finished()
    build_stacked_trainer(cfgs("cut")).fit()
    for s in (0, 1):
        whole, cut = (RunDir(tmp_path / name / f"s{s}").latest_weights() for name in ("whole", "cut"))
        for key in whole:
            assert torch.equal(whole[key], cut[key]), key
        assert (RunDir(tmp_path / "whole" / f"s{s}").read_metrics()["history"][-1]["train_loss"]
                == RunDir(tmp_path / "cut" / f"s{s}").read_metrics()["history"][-1]["train_loss"])


@pytest.mark.parametrize("arch, poisoned", [("mnist", "gate.out.bias"), ("fmnist", "gate.conv.weight")])
def test_a_diverging_member_stops_and_the_others_go_on(tmp_path, data_root, capsys, arch, poisoned):
    """Member 1 turns NaN: after its gate's last layer, or (fmnist) inside the fused
    convolution + BatchNorm + pooling block, whose backward must not fail on NaN windows."""
    config = CONFIGS / arch / "vanilla.yaml"
    cfgs = [load_config(config, _overrides(tmp_path / f"s{s}", data_root, f"seed={s}")) for s in (0, 1, 2)]
    trainer = build_stacked_trainer(cfgs)
    with torch.no_grad():  # member 1's gate now outputs NaN: its first loss is NaN
        trainer.members[1].model.get_parameter(poisoned).fill_(math.nan)
    results = trainer.fit()
    assert results[1]["stopped_early_at"] == 1 and results[1]["steps"] == 0
    assert "diverged" in capsys.readouterr().err
    alone = [build_trainer(load_config(config, _overrides(tmp_path / f"alone{s}", data_root, f"seed={s}")))
             for s in (0, 1, 2)]
    with torch.no_grad():  # a run alone that turns NaN stops the same way
        alone[1].model.get_parameter(poisoned).fill_(math.nan)
    alone = [t.fit() for t in alone]
    assert alone[1]["stopped_early_at"] == 1 and alone[1]["steps"] == 0
    assert "training loss is nan: the run diverged" in capsys.readouterr().err
    _assert_histories_match(alone[0], results[0])
    _assert_histories_match(alone[2], results[2])


def test_stacks_group_by_architecture_and_refuse_mixtures(tmp_path):
    vanilla, lcv, attentive = (load_config(CONFIGS / "fmnist" / f"{n}.yaml", [f"run_dir={tmp_path}/{n}"])
                               for n in ("vanilla", "vanilla_lcv", "attentive"))
    hierarchical = load_config(CONFIGS / "fmnist" / "hierarchical.yaml")
    assert stack_groups([vanilla, attentive, lcv, hierarchical]) == [[0, 2], [1], [3]]
    with pytest.raises(ConfigError, match="stacked runs must share moe.routing"):
        build_stacked_trainer([vanilla, attentive])
    with pytest.raises(ConfigError, match="hierarchical"):
        build_stacked_trainer([hierarchical, hierarchical])


# ----------------------------------------------------------------------------- commands


def test_sweep_stack_trains_the_sweep_as_stacks_and_matches_the_plain_sweep(tmp_path, data_root, capsys):
    """``moe-dist sweep FILE --stack``: training runs stacked by architecture, then the
    distillations stacked over their sources; each run folder as the plain sweep writes it."""
    from moe_dist.cli import main

    spec = {"seeds": [0, 1],
            "overrides": ["data.name=mnist10k", f"data.root={data_root}", "data.train_size=300", "data.test_size=100",
                          "train.epochs=1", "train.progress=false", "train.num_threads=1"],
            "members": [{"name": "vanilla", "config": str(CONFIGS / "mnist" / "vanilla.yaml")},
                        {"name": "vanilla_lcv", "config": str(CONFIGS / "mnist" / "vanilla_lcv.yaml")},
                        {"name": "src", "config": str(CONFIGS / "mnist" / "attentive_lcv.yaml")},
                        {"name": "distilled", "config": str(CONFIGS / "mnist" / "distilled_lcv.yaml"),
                         "distill": "src"}]}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(sweep), "--stack", "--list", "--root", str(tmp_path / "stacked")]) == 0
    listed = capsys.readouterr().out
    assert "stack 0 (4 runs): vanilla/seed0, vanilla/seed1, vanilla_lcv/seed0, vanilla_lcv/seed1" in listed
    assert "then 2 distillations" in listed
    assert main(["sweep", str(sweep), "--stack", "--root", str(tmp_path / "stacked")]) == 0
    assert "8/8 runs done" in capsys.readouterr().out
    assert main(["sweep", str(sweep), "--only", "src,distilled", "--seeds", "1", "--root", str(tmp_path / "plain")]) == 0
    for run in ("src/seed1", "distilled/seed1"):
        stacked, plain = (RunDir(tmp_path / root / run).read_metrics() for root in ("stacked", "plain"))
        assert stacked["stack_members"] == 2 and "stack_members" not in plain
        _assert_histories_match(plain, stacked)
    stacked, plain = (RunDir(tmp_path / root / "distilled/seed1").read_metrics() for root in ("stacked", "plain"))
    assert stacked["experts_unchanged"] and stacked["conditional"]["top1"]["test_error"] == pytest.approx(
        plain["conditional"]["top1"]["test_error"], abs=0.011)


def test_train_seeds_writes_one_run_per_seed_and_skips_them_when_finished(tmp_path, capsys):
    from moe_dist.cli import main

    args = ["train", "--seeds", "0-1,3", f"run_dir={tmp_path}", "data.train_size=300", "data.test_size=100",
            "train.epochs=1", "train.progress=false", "train.num_threads=1"]
    assert main(args) == 0
    runs = [RunDir(tmp_path / f"seed{s}") for s in (0, 1, 3)]
    assert all(r.finished() for r in runs) and [r.read_config().seed for r in runs] == [0, 1, 3]
    assert runs[2].read_metrics()["stack_members"] == 3
    written = [r.metrics_path.stat().st_mtime_ns for r in runs]
    assert main(args) == 0
    assert [r.metrics_path.stat().st_mtime_ns for r in runs] == written
    capsys.readouterr()
    assert main(["train", "--seeds", "1-x", f"run_dir={tmp_path}"]) != 0
    assert "--seeds '1-x': '1-x' is neither a seed nor a range A-B" in capsys.readouterr().err


def test_members_killed_between_their_checkpoints_catch_up(tmp_path, data_root, capsys):
    """A kill between two members' checkpoints leaves them at different epochs: the member
    behind trains alone (the other computed but unchanged) until they stand together, and
    both end as an uninterrupted stack ends."""
    import shutil

    config = CONFIGS / "fmnist" / "vanilla.yaml"

    def cfgs(name: str, epochs: int):
        return [load_config(config, _overrides(tmp_path / name / f"s{s}", data_root, f"seed={s}",
                                               f"train.epochs={epochs}")) for s in (0, 1)]
    whole = build_stacked_trainer(cfgs("whole", 2)).fit()
    build_stacked_trainer(cfgs("cut", 1)).fit()
    shutil.rmtree(tmp_path / "cut" / "s1")  # s1 lost its epoch-1 checkpoint; s0 kept it
    (tmp_path / "cut" / "s0" / "metrics.json").unlink()  # epochs raised to 2: s0 goes on
    capsys.readouterr()
    cut = build_stacked_trainer(cfgs("cut", 2)).fit()
    assert "catching up: 1 of 2 runs stand at epoch 0 batch 0" in capsys.readouterr().err
    for s in (0, 1):
        a, b = (RunDir(tmp_path / name / f"s{s}").latest_weights() for name in ("whole", "cut"))
        for key in a:
            assert torch.equal(a[key], b[key]), (s, key)
        assert whole[s]["history"][-1]["train_loss"] == cut[s]["history"][-1]["train_loss"]
