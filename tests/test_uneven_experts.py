"""Uneven expert placement: E = 5 experts on 2 and 4 expert-parallel ranks (blocks 3 + 2 and
2 + 1 + 1 + 1) against one process on the same global batch, and a paper config (5 experts)
trained at ep_size 2 that resumes at 1, 3 and 5 processes.

The machinery is tests/test_parallel.py's (the even case): spawned gloo worlds write what they
computed, the test compares with one process here. The experts' weights differ by expert, so
an expert served or stored under the wrong global id shows.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from moe_dist.config import LossConfig, ModelConfig, MoEConfig, load_config
from moe_dist.errors import ConfigError
from moe_dist.models import build_model
from moe_dist.parallel import ParallelContext, check_layout
from moe_dist.parallel.groups import expert_blocks
from procs import spawn
from test_parallel import PARAM_TOL, assert_matches_one_process, assert_same_run, make_batches
from test_parallel import distributed_run
from test_parallel import single_process_run as parallel_reference

REPO = Path(__file__).resolve().parent.parent
E = 5
STEPS = 3
GLOBAL_BATCH = 7  # 4 + 3 on 2 ranks, 2 + 2 + 2 + 1 on 4
# topk_pair: top-2 with a gate biased towards experts 0 and 1, which sit together on EP rank 0
# in both layouts: every sample of the other ranks has both its experts on one remote rank (its row goes once), and
# the ranks holding experts 2-4 receive nothing.
ROUTINGS = ("dense", "topk", "attentive", "topk_pair")
WORLDS = (2, 4)  # ep_size = world: 3 + 2 and 2 + 1 + 1 + 1 experts
# Adam's second moments are squares of gradients that agree to TOL: compare them relatively.
MOMENT_TOL = dict(rtol=1e-4, atol=1e-10)
# Adam's step lr * m / (sqrt(v) + eps) changes by up to lr / eps times a change of the
# gradient, and gradients of the layouts differ by rounding (~1e-8 here; some elements are 0
# in one process and ~4e-9 in another order of summation): eps 1e-4 keeps that factor at 10,
# where the default 1e-8 turns rounding into lr-sized parameter differences.
ADAM = dict(lr=1e-3, eps=1e-4)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """In-process runs here use train.num_threads=1; give the session its thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_model(case: str, seed: int = 0):
    """The MNIST-architecture MoE with 5 experts (no BatchNorm) and both gate losses."""
    torch.manual_seed(seed)
    routing = "topk" if case.startswith("topk") else case
    moe = MoEConfig(num_experts=E, routing=routing, top_k=2 if routing == "topk" else 1,
                    noise="gaussian" if routing == "topk" else "none")
    model = build_model(ModelConfig(arch="mnist"), moe,
                        LossConfig(importance_weight=0.3, ls_beta=2.0, ls_gamma=1.0), 10, (1, 28, 28))
    with torch.no_grad():  # experts that differ clearly, so that a mixed-up id shows
        for p in model.experts.parameters():
            p.add_(0.05 * torch.arange(E, dtype=p.dtype).view(-1, *[1] * (p.dim() - 1)))
        if case == "topk_pair":
            model.gate.out.bias.copy_(torch.tensor([30.0, 30.0, -30.0, -30.0, -30.0]))
    return model


def single_process_run(routing: str, batches) -> dict:
    return parallel_reference(routing, batches, make=make_model, adam=ADAM)


def equivalence_worker(rank: int, world: int, out_dir: str) -> None:
    from moe_dist.parallel import parallelize

    batches = make_batches(STEPS, GLOBAL_BATCH)
    ctx = ParallelContext.create(ep_size=world, num_experts=E)
    for routing in ROUTINGS:
        model = parallelize(make_model(routing), ctx)
        record = {"local_experts": model.experts.num_experts,
                  **distributed_run(model, ctx, batches, rank, world, adam=ADAM)}
        torch.save(record, Path(out_dir) / f"w{world}_{routing}_rank{rank}.pt")


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("uneven")
    batches = make_batches(STEPS, GLOBAL_BATCH)
    references = {routing: single_process_run(routing, batches) for routing in ROUTINGS}
    for world in WORLDS:
        spawn(equivalence_worker, world, str(out))
    return out, references


def assert_same_optimizer_state(ours: dict, ref: dict) -> None:
    """Adam's step and moments of every parameter, experts by global id."""
    assert set(ours["state"]) == set(ref["state"])
    for idx, entry in ref["state"].items():
        for key, value in entry.items():
            tol = MOMENT_TOL if key == "exp_avg_sq" else PARAM_TOL
            torch.testing.assert_close(ours["state"][idx][key], value, **tol,
                                       msg=lambda m: f"optimizer state {idx}.{key}: {m}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_uneven_blocks_equal_one_process(equivalence_runs, world, routing):
    """Outputs, L_cv, L_s, the loss, every gradient after one step, and every parameter and
    Adam moment after three steps equal one process on the concatenated batch."""
    out_dir, references = equivalence_runs
    ref = references[routing]
    records = [torch.load(out_dir / f"w{world}_{routing}_rank{r}.pt") for r in range(world)]
    assert [r["local_experts"] for r in records] == [len(b) for b in expert_blocks(E, world)]
    assert_matches_one_process(records, ref)
    for rec in records:  # every rank: gathered Adam moments in global id order
        assert_same_optimizer_state(rec["optimizer"], ref["optimizer"])
    if routing.startswith("topk"):
        assert sum(r["routing_stats"]["expert_rows"] for r in records) == GLOBAL_BATCH * 2
        assert all(r["routing_stats"]["dropped"] == 0 for r in records)
    if routing == "topk_pair":  # experts 0 and 1 on rank 0: the others send each row there once
        for r, rec in enumerate(records[1:], start=1):
            assert rec["routing_stats"]["remote_rows_sent"] == rec["batch"], r
            assert rec["routing_stats"]["min_remote_rows"] == rec["batch"], r
            # both outputs summed on rank 0: one row back per sample, not one per pair
            assert rec["routing_stats"]["remote_rows_returned"] == rec["batch"], r
            assert rec["routing_stats"]["expert_rows"] == 0, r
        assert records[0]["routing_stats"]["expert_rows"] == GLOBAL_BATCH * 2


# ----------------------------------------------------------------------------- a paper config
# configs/mnist/vanilla.yaml (5 experts, dense) on the mnist10k fixture, shortened.


def vanilla(run_dir: Path, root: str, *extra: str):
    overrides = [f"run_dir={run_dir}", "data.name=mnist10k", f"data.root={root}", "data.train_size=512",
                 "data.test_size=256", "train.batch_size=100", "train.eval_batch_size=200", "train.epochs=3",
                 "train.lr=3e-3", "train.progress=false", "train.num_threads=1", *extra]
    return load_config(REPO / "configs" / "mnist" / "vanilla.yaml", overrides)


def loaded_report(trainer, payload: dict) -> dict:
    """After loading a full-layout checkpoint: this rank's block, and the largest difference
    between its experts' weights / Adam moments and the checkpoint's rows of the same ids."""
    block = trainer.ctx.local_experts(E) if trainer.ctx.ep_size > 1 else range(E)
    report = {"block": [block.start, block.stop], "weights": 0.0, "moments": 0.0}
    optimizer = trainer.engine.optimizer
    order = [p for group in optimizer.param_groups for p in group["params"]]
    for name, p in trainer.model.named_parameters():
        if not name.startswith("experts."):
            continue
        saved = payload["model"][name][block.start:block.stop]
        report["weights"] = max(report["weights"], float((p.detach() - saved).abs().max()))
        saved_state = payload["optimizer"]["state"][next(i for i, q in enumerate(order) if q is p)]
        for key in ("exp_avg", "exp_avg_sq"):
            diff = optimizer.state[p][key] - saved_state[key][block.start:block.stop]
            report["moments"] = max(report["moments"], float(diff.abs().max()))
    return report


def train_worker(rank: int, world: int, run_dir: str, root: str, out_dir: str, epochs: int) -> None:
    """Train the vanilla run at ep_size = world, or resume it (a checkpoint in ``run_dir``):
    then first load the checkpoint into this rank's part and report what it holds."""
    from moe_dist.train.build import build_trainer
    from moe_dist.train.checkpoint import load_checkpoint

    trainer = build_trainer(vanilla(Path(run_dir), root, f"parallel.ep_size={world}", f"train.epochs={epochs}"))
    payload = load_checkpoint(Path(run_dir) / "checkpoints")
    if payload is not None:
        trainer.engine.load_model_state(payload["model"])
        trainer.engine.load_optimizer_state(payload["optimizer"])
        report = loaded_report(trainer, payload)
        (Path(out_dir) / f"loaded_w{world}_rank{rank}.json").write_text(json.dumps(report))
    result = trainer.fit()  # resumes from the checkpoint itself
    if rank == 0:
        (Path(out_dir) / f"result_w{world}.json").write_text(json.dumps(result))


@contextlib.contextmanager
def restored(run: Path, spare: Path):
    """Resume ``run`` in place (a run refuses another run_dir), then put it back as it was."""
    shutil.copytree(run, spare)
    try:
        yield run
    finally:
        shutil.rmtree(run)
        shutil.copytree(spare, run)


@pytest.fixture(scope="module")
def vanilla_reference(tmp_path_factory, data_root):
    """One process, four epochs; its epoch-3 checkpoint is kept (keep_checkpoints=2)."""
    from moe_dist.train.build import build_trainer

    run = tmp_path_factory.mktemp("vanilla_reference") / "run"
    return run, build_trainer(vanilla(run, data_root, "train.epochs=4")).fit()


@pytest.fixture(scope="module")
def vanilla_ep2(tmp_path_factory, data_root):
    """Two processes, ep_size 2 (experts 0-2 and 3-4), three epochs."""
    out = tmp_path_factory.mktemp("vanilla_ep2")
    spawn(train_worker, 2, str(out / "run"), data_root, str(out), 3)
    return out / "run", json.loads((out / "result_w2.json").read_text())


@pytest.mark.multiprocess
def test_vanilla_config_at_ep2_trains_like_one_process(vanilla_ep2, vanilla_reference):
    """The 5-expert paper config on 2 ranks follows the one-process history, and its checkpoint
    holds the one-process epoch-3 weights and Adam moments under the same global ids."""
    from moe_dist.train.checkpoint import load_checkpoint

    run, result = vanilla_ep2
    ref_run, reference = vanilla_reference
    assert (result["num_processes"], result["ep_size"]) == (2, 2)
    assert_same_run(result, reference, 3)
    ours = load_checkpoint(run / "checkpoints")
    theirs = torch.load(ref_run / "checkpoints" / "epoch_0003.pt", weights_only=True)
    assert set(ours["model"]) == set(theirs["model"])
    for name, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][name], value, **PARAM_TOL, msg=lambda m: f"{name}: {m}")
    w = ours["model"]["experts.fc1.weight"]
    assert w.shape[0] == E and all(not torch.allclose(w[i], w[j]) for i in range(E) for j in range(i + 1, E))
    assert_same_optimizer_state(ours["optimizer"], theirs["optimizer"])


@pytest.mark.multiprocess
def test_vanilla_ep2_checkpoint_resumes_in_one_process(vanilla_ep2, vanilla_reference, data_root, tmp_path):
    from moe_dist.train.build import build_trainer
    from moe_dist.train.checkpoint import load_checkpoint

    with restored(vanilla_ep2[0], tmp_path / "backup") as run:
        trainer = build_trainer(vanilla(run, data_root, "train.epochs=4"))
        payload = load_checkpoint(run / "checkpoints")
        trainer.engine.load_model_state(payload["model"])
        trainer.engine.load_optimizer_state(payload["optimizer"])
        assert loaded_report(trainer, payload) == {"block": [0, E], "weights": 0.0, "moments": 0.0}
        result = trainer.fit()
    assert (result["num_processes"], result["ep_size"]) == (1, 1)
    assert_same_run(result, vanilla_reference[1], 4)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [3, 5])
def test_vanilla_ep2_checkpoint_resumes_at_other_ep_sizes(vanilla_ep2, vanilla_reference, data_root, tmp_path, world):
    """Saved at 3 + 2 experts, loaded at 2 + 2 + 1 (world 3) and 1 each (world 5): every rank
    holds exactly the checkpoint's weights and Adam moments of its global ids, and the resumed
    epoch follows the one-process run."""
    with restored(vanilla_ep2[0], tmp_path / "backup") as run:
        # Resumed as after a preemption (a checkpoint, no metrics.json), not as a finished run
        # extended: for the latter, rank 0 rewrites config.yaml (epochs=4) while other ranks may
        # still be reading it to decide whether the run is finished, and a rank that then finds
        # it finished leaves the others waiting (Trainer.fit; seen here about one time in three).
        (run / "metrics.json").unlink()
        spawn(train_worker, world, str(run), data_root, str(tmp_path), 4)
    reports = [json.loads((tmp_path / f"loaded_w{world}_rank{r}.json").read_text()) for r in range(world)]
    assert [r["block"] for r in reports] == [[b.start, b.stop] for b in expert_blocks(E, world)]
    assert all(r["weights"] == 0.0 and r["moments"] == 0.0 for r in reports), reports
    result = json.loads((tmp_path / f"result_w{world}.json").read_text())
    assert (result["num_processes"], result["ep_size"]) == (world, world)
    assert_same_run(result, vanilla_reference[1], 4)


# ----------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("ep_size,sizes", [(1, [5]), (2, [3, 2]), (3, [2, 2, 1]), (4, [2, 1, 1, 1]),
                                           (5, [1, 1, 1, 1, 1])])
def test_expert_blocks_are_contiguous_and_differ_by_at_most_one(ep_size, sizes):
    blocks = expert_blocks(E, ep_size)
    assert [len(b) for b in blocks] == sizes
    assert [i for b in blocks for i in b] == list(range(E))
    ctx = ParallelContext(rank=ep_size + 1, world_size=2 * ep_size, ep_size=ep_size)  # second EP group
    assert ctx.local_experts(E) == blocks[1 % ep_size] and ctx.expert_counts(E) == tuple(sizes)


@pytest.mark.parametrize("ep_size,sizes", [(1, [20]), (2, [10, 10]), (3, [10, 5, 5]), (4, [5, 5, 5, 5])])
def test_expert_groups_stay_on_one_rank(ep_size, sizes):
    # hierarchical routing: 4 groups of 5 experts; a group is never split over ranks
    blocks = expert_blocks(20, ep_size, unit=5)
    assert [len(b) for b in blocks] == sizes
    assert [i for b in blocks for i in b] == list(range(20))
    assert all(b.start % 5 == 0 for b in blocks)


def test_more_ranks_than_expert_groups_is_refused():
    with pytest.raises(ConfigError, match="parallel.ep_size=5 exceeds moe.num_groups=4: a group of experts lives on one rank"):
        expert_blocks(20, 5, unit=5)


def test_ep_size_may_leave_a_remainder_but_not_exceed_the_experts():
    check_layout(2, 2, 5)
    check_layout(4, 4, 5)
    check_layout(6, 3, 20)
    assert load_config(REPO / "configs" / "mnist" / "vanilla.yaml", ["parallel.ep_size=2"]).parallel.ep_size == 2
    message = "parallel.ep_size=6 exceeds moe.num_experts=5: every expert-parallel rank must hold at least one expert"
    with pytest.raises(ConfigError) as error:
        check_layout(6, 6, 5)
    assert str(error.value) == message
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs" / "mnist" / "vanilla.yaml", ["parallel.ep_size=6"])
    assert str(error.value) == message
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        check_layout(3, 2, 5)


DEEPSPEED_UNEVEN = ("engine=deepspeed needs moe.num_experts=5 divisible by parallel.ep_size=2; "
                    "engine=moe_dist places uneven expert blocks")


def test_deepspeed_refuses_uneven_blocks_before_any_group_work(monkeypatch):
    """engine=deepspeed keeps E / ep_size experts per rank: one line naming engine=moe_dist,
    before DeepSpeed joins or builds a process group."""
    import moe_dist.parallel.deepspeed_engine as deepspeed_engine
    import moe_dist.train.build as build
    from moe_dist.launch import LaunchPlan, preflight

    cfg = load_config(REPO / "configs" / "mnist" / "vanilla.yaml", ["engine=deepspeed", "parallel.ep_size=2"])
    monkeypatch.setattr(build, "world_size", lambda: 2)  # as on 2 ranks
    monkeypatch.setattr(deepspeed_engine, "init_deepspeed", lambda cpu: pytest.fail("group work before the check"))
    with pytest.raises(ConfigError) as error:
        build._parallel_context(cfg, True)
    assert str(error.value) == DEEPSPEED_UNEVEN
    plan = LaunchPlan(device="cpu", num_processes=2,
                      overrides=("engine=deepspeed", "parallel.ep_size=2", "moe.num_experts=5"))
    with pytest.raises(ConfigError) as error:
        preflight(plan, gpu_count=0)
    assert str(error.value) == DEEPSPEED_UNEVEN
