"""Expert parallelism: N real processes (gloo) against one process on the concatenated batch.

Tier 2 of docs/design.md, "Code style": each multi-process job runs in spawned processes (gloo on 127.0.0.1, a
free port), writes what it computed to files, and the test compares with a single-process
computation here. One job per world size covers every ep_size and routing mode, because
starting processes is the expensive part on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_dist import losses
from moe_dist.config import LossConfig, ModelConfig, MoEConfig
from moe_dist.errors import ConfigError
from moe_dist.models import build_model
from moe_dist.parallel import (ParallelContext, check_layout, world_info_from_env)
from moe_dist.parallel.env import first_slurm_host
from procs import free_port, spawn

REPO = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-5, atol=1e-6)
# After optimizer steps: Adam divides by sqrt(v), which turns rounding-level differences of
# near-zero gradient elements into differences of order lr * (their relative error).
PARAM_TOL = dict(rtol=1e-5, atol=1e-5)

# ----------------------------------------------------------------------------- harness


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """In-process runs here use train.num_threads=1 (like the launched ranks); give the rest
    of the session its thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the model

E = 4
GLOBAL_BATCH = 7  # uneven over 2 and 4 ranks (4+3, 2+2+2+1): some rank routes nothing to some expert
STEPS = 3
# topk_idle: top-1 with a gate biased so that experts 2 and 3 receive nothing from any rank
# (with ep_size 2 a whole rank's experts sit idle: zero rows in every all-to-all).
ROUTINGS = ("dense", "topk", "attentive", "topk_idle")


def make_model(case: str, seed: int = 0):
    """A tiny MNIST-architecture MoE (no BatchNorm; tests/test_global_batchnorm.py covers the
    BatchNorm architectures) with both gate losses, so every code path of the dispatch and
    the reductions is exercised."""
    torch.manual_seed(seed)
    routing = "topk" if case.startswith("topk") else case
    moe = MoEConfig(num_experts=E, routing=routing, top_k=2 if case == "topk" else 1,
                    noise="gaussian" if routing == "topk" else "none")
    model = build_model(ModelConfig(arch="mnist"), moe,
                        LossConfig(importance_weight=0.3, ls_beta=2.0, ls_gamma=1.0), 10, (1, 28, 28))
    with torch.no_grad():  # experts that differ clearly, so that a mixed-up id shows
        for p in model.experts.parameters():
            p.add_(0.05 * torch.arange(E, dtype=p.dtype).view(-1, *[1] * (p.dim() - 1)))
        if case == "topk_idle":
            model.gate.out.bias.copy_(torch.tensor([30.0, 30.0, -30.0, -30.0]))
    return model


def make_batches(steps: int = STEPS, size: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(steps)]


def rank_slice(n: int, rank: int, world: int) -> slice:
    """TensorBatches' split: contiguous, sizes differ by at most one, earlier ranks larger."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def loss_share(out, y, global_batch: int):
    """This rank's share of the global loss: sum of its NLLs / B + its aux-loss shares."""
    picked = out.output.gather(1, y.unsqueeze(1)).squeeze(1)
    nll = -torch.log(picked + 1e-7).sum() / global_batch
    return nll + sum(out.aux_losses.values()), nll


def single_process_run(routing: str, batches, make=None, adam=None):
    """The reference: one process, the concatenated batch (``make(routing)`` builds the model,
    default this file's ``make_model``; ``adam``: Adam's keyword arguments)."""
    model = (make or make_model)(routing)
    opt = torch.optim.Adam(model.parameters(), **(adam or {"lr": 1e-3}))
    record = {}
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(100 + step)
        out = model(x)
        total = losses.mixture_nll(out.output, y) + sum(out.aux_losses.values())
        opt.zero_grad()
        total.backward()
        record.setdefault("losses", []).append(float(total.detach()))
        if step == 0:
            record.update(output=out.output.detach(), total=total.detach(),
                          aux={k: v.detach() for k, v in out.aux_losses.items()},
                          grads={n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    record["params"] = {k: v.clone() for k, v in model.state_dict().items()}
    record["optimizer"] = opt.state_dict()
    record["input_grad"] = input_gradient(model, batches[0][0])
    return record


def input_gradient(model, x: torch.Tensor) -> torch.Tensor:
    """The gradient of the first batch's output with respect to the input, after the steps: one
    more forward and backward through every exchange of the dispatch, apart from the steps (an
    input that needs a gradient takes the PyTorch blocks instead of the native ones)."""
    torch.manual_seed(999)
    x = x.clone().requires_grad_(True)
    model(x).output.square().sum().backward()  # a sum over the rows: each rank adds its share
    model.zero_grad(set_to_none=True)
    return x.grad


def distributed_run(model, ctx, batches, rank: int, world: int, adam=None) -> dict:
    """One rank's share of ``single_process_run``: this rank's slice of every global batch, its
    loss share, summed gradients, Adam; every step's global loss, the first step's values and
    the final parameters (BatchNorm buffers included) and optimizer state in the full layout
    (collective: call it on every rank)."""
    import torch.distributed as dist

    from moe_dist.parallel import GradientReducer, full_model_state, full_optimizer_state

    reduce_grads = GradientReducer(model, ctx)
    opt = torch.optim.Adam(model.parameters(), **(adam or {"lr": 1e-3}))
    record = {}
    for step, (x, y) in enumerate(batches):
        mine = rank_slice(len(x), rank, world)
        torch.manual_seed(100 + step)
        out = model(x[mine])
        total, _ = loss_share(out, y[mine], len(x))
        opt.zero_grad()
        total.backward()
        reduce_grads()
        loss = total.detach().clone()  # every step's global loss (the shares summed)
        dist.all_reduce(loss)
        record.setdefault("losses", []).append(float(loss))
        if step == 0:
            parts = torch.stack([total.detach()] + [v.detach() for v in out.aux_losses.values()])
            dist.all_reduce(parts)
            grads = {n: p.grad for n, p in model.named_parameters()}
            record.update(output=out.output.detach(), total=parts[0], aux=dict(zip(out.aux_losses, parts[1:])),
                          counts=out.samples_per_expert, routing_stats=out.routing_stats, batch=x[mine].shape[0],
                          # gradients in the full layout, gathered like a checkpoint
                          grads=full_model_state(_GradView(model, grads), ctx))
        opt.step()
    # copies: the input-gradient pass below moves BatchNorm's running statistics in place
    record["params"] = {k: v.clone() for k, v in full_model_state(model, ctx).items()}
    record["optimizer"] = full_optimizer_state(opt, model, ctx)
    record["input_grad"] = input_gradient(model, batches[0][0][rank_slice(len(batches[0][0]), rank, world)])
    return record


def equivalence_worker(rank: int, world: int, out_dir: str, ep_sizes: list[int]) -> None:
    import torch.distributed as dist

    from moe_dist.parallel import (GradientReducer, ParallelContext, full_model_state,
                                   parallelize)

    batches = make_batches()
    for ep in ep_sizes:
        ctx = ParallelContext.create(ep_size=ep, num_experts=E)
        for routing in ROUTINGS:
            record = distributed_run(parallelize(make_model(routing), ctx), ctx, batches, rank, world)
            torch.save(record, Path(out_dir) / f"w{world}_ep{ep}_{routing}_rank{rank}.pt")
        # capacity factor: each rank drops what exceeds its capacity, before the all-to-all
        model = parallelize(make_capacity_model(), ctx)
        x = batches[0][0][rank_slice(GLOBAL_BATCH, rank, world)]
        out = model(x)
        torch.save({"output": out.output.detach(), "routing_stats": out.routing_stats},
                   Path(out_dir) / f"w{world}_ep{ep}_capacity_rank{rank}.pt")
        # a global batch smaller than the world: some rank holds no sample at all
        small_x, small_y = batches[0][0][:SMALL_BATCH], batches[0][1][:SMALL_BATCH]
        mine = rank_slice(SMALL_BATCH, rank, world)
        for routing in ROUTINGS:
            model = parallelize(make_model(routing), ctx)
            torch.manual_seed(100)
            out = model(small_x[mine])
            total, _ = loss_share(out, small_y[mine], SMALL_BATCH)
            total.backward()
            GradientReducer(model, ctx)()
            parts = total.detach().clone()
            dist.all_reduce(parts)
            grads = {n: p.grad for n, p in model.named_parameters()}
            torch.save({"output": out.output.detach(), "total": parts,
                        "grads": full_model_state(_GradView(model, grads), ctx)},
                       Path(out_dir) / f"w{world}_ep{ep}_{routing}_small_rank{rank}.pt")
        # bf16 autocast: routing, gate probabilities and gate losses stay float32
        model = parallelize(make_model("topk"), ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            total, _ = loss_share(out, batches[0][1][rank_slice(GLOBAL_BATCH, rank, world)], GLOBAL_BATCH)
        total.backward()
        dtypes = {"gate_probs": out.gate_probs.dtype, "output": out.output.dtype,
                  **{k: v.dtype for k, v in out.aux_losses.items()}}
        torch.save(dtypes, Path(out_dir) / f"w{world}_ep{ep}_bf16_rank{rank}.pt")


class _GradView(torch.nn.Module):
    """A module whose state dict is another module's gradients (to gather them like weights)."""

    def __init__(self, model, grads):
        super().__init__()
        self.inner = model
        self._grads = grads

    def named_modules(self, *args, **kwargs):
        return self.inner.named_modules(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return dict(self._grads)


VALID = [(w, ep) for w in (2, 4) for ep in (1, 2, 4) if w % ep == 0]
CAPACITY_FACTOR = 0.5
SMALL_BATCH = 3  # on 4 ranks: 1 + 1 + 1 + 0


def make_capacity_model():
    model = make_model("topk")
    model.noise = "none"  # one process on each rank's share must route like the rank does
    model.capacity_factor = CAPACITY_FACTOR
    return model


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    batches = make_batches()
    references = {routing: single_process_run(routing, batches) for routing in ROUTINGS}
    for world in (2, 4):
        spawn(equivalence_worker, world, str(out), [ep for w, ep in VALID if w == world])
    return out, references

def assert_matches_one_process(records: list[dict], ref: dict) -> None:
    """The ranks' records of one equivalence run against the single-process reference:
    outputs (concatenated), the total loss and gate losses on every rank, every gradient
    (rank 0), and every parameter after the Adam steps on every rank (replicas agree, and
    gathered experts are in global id order), and the input's gradient after them (its rows on
    their ranks: the dispatch's backward through every exchange)."""
    torch.testing.assert_close(torch.cat([r["output"] for r in records]), ref["output"], **TOL)
    torch.testing.assert_close(torch.cat([r["input_grad"] for r in records]), ref["input_grad"], **TOL)
    for rec in records:
        torch.testing.assert_close(rec["total"], ref["total"], **TOL)
        assert set(rec["aux"]) == {"importance", "sample_similarity"}
        for name, value in ref["aux"].items():
            torch.testing.assert_close(rec["aux"][name], value, **TOL)
    grads = records[0]["grads"]
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=lambda m: f"grad {name}: {m}")
    for rec in records:
        for name, p in ref["params"].items():
            torch.testing.assert_close(rec["params"][name], p, **PARAM_TOL, msg=lambda m: f"param {name}: {m}")



@pytest.mark.multiprocess
@pytest.mark.parametrize("world,ep", VALID)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_n_ranks_equal_one_process(equivalence_runs, world, ep, routing):
    """Outputs, L_cv, L_s, the total loss, every gradient after one step and every parameter
    after three Adam steps equal one process on the concatenated (uneven) batch."""
    out_dir, references = equivalence_runs
    ref = references[routing]
    records = [torch.load(out_dir / f"w{world}_ep{ep}_{routing}_rank{r}.pt") for r in range(world)]
    assert_matches_one_process(records, ref)
    if routing.startswith("topk"):
        k = 2 if routing == "topk" else 1
        assert sum(r["routing_stats"]["routed"] for r in records) == GLOBAL_BATCH * k
        assert sum(r["routing_stats"]["expert_rows"] for r in records) == GLOBAL_BATCH * k
        assert all(r["routing_stats"]["dropped"] == 0 for r in records)
    if routing == "topk_idle":  # the hang-prone case: experts, and with ep_size 2 ranks, idle
        assert all(r["counts"][2:].sum() == 0 for r in records)
        if ep == 2:
            assert all(r["routing_stats"]["expert_rows"] == 0 for r in records[1::2])


# ----------------------------------------------------------------------------- training runs
# The global batch is the unit: N ranks train like one process, and checkpoints load at any
# ep_size. Runs use real launchers (torchrun, accelerate launch) on the mnist10k fixture.

LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu",
              "ACCELERATE_USE_CPU": "true"}  # without it accelerate reports 1 process (A1)


def mnist_overrides(run_dir: Path, root: str, *extra: str) -> list[str]:
    """A seconds-long dense MoE run with both gate losses; 512 samples in global batches of
    100, so the last batch (12) and the evaluation batches split unevenly."""
    return [f"run_dir={run_dir}", "data.name=mnist10k", f"data.root={root}", "data.train_size=512",
            "data.test_size=256", "model.arch=mnist", "moe.num_experts=4", "moe.routing=dense",
            "loss.importance_weight=0.1", "loss.ls_beta=1.0", "loss.ls_gamma=0.5",
            "train.batch_size=100", "train.eval_batch_size=200", "train.epochs=3", "train.lr=3e-3",
            "train.progress=false", "train.num_threads=1", *extra]


def launch(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **LAUNCH_ENV}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"launch timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def train_command(args: list[str]) -> list[str]:
    """`moe-dist train` on the config defaults (an empty file: no embedded default) + args."""
    defaults = Path(args[0].split("=", 1)[1]).parent / "defaults.yaml"
    defaults.parent.mkdir(parents=True, exist_ok=True)
    defaults.write_text("# every key at its default; the test's overrides follow\n")
    return ["-m", "moe_dist.cli", "train", "--config", str(defaults), *args]


def torchrun(nproc: int, args: list[str]):
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), *train_command(args)])


def accelerate_launch(nproc: int, args: list[str]):
    return launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(nproc), "--main_process_port", str(free_port()),
                   "--mixed_precision", "no", "--dynamo_backend", "no", *train_command(args)])


def train_in_process(overrides: list[str]) -> dict:
    from moe_dist.config import load_config
    from moe_dist.train.build import build_trainer

    return build_trainer(load_config(None, overrides)).fit()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_root):
    """One process, four epochs: epoch 3 is the target of the 3-epoch multi-rank runs, epoch
    4 the target of their resumptions."""
    run = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    try:
        return train_in_process(mnist_overrides(run, data_root, "train.epochs=4"))
    finally:
        torch.set_num_threads(threads)


def assert_same_run(result: dict, reference: dict, epoch: int) -> None:
    """A run's epoch-by-epoch history equals the reference's (final loss within 1e-3 rel)."""
    ours, ref = result["history"], reference["history"][:epoch]
    assert len(ours) == len(ref) == epoch
    assert ours[-1]["train_loss"] == pytest.approx(ref[-1]["train_loss"], rel=1e-3)
    for a, b in zip(ours, ref):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_error"] == b["train_error"]
        assert a["test_error"] == b["test_error"]
        assert a["mutual_information"] == pytest.approx(b["mutual_information"], rel=1e-5, abs=1e-7)


@pytest.mark.multiprocess
def test_torchrun_two_ranks_train_like_one_process(tmp_path, data_root, reference_run):
    """`torchrun --nproc_per_node 2 -m moe_dist.cli train` with ep_size 1 (data parallel)."""
    run = tmp_path / "run"
    torchrun(2, mnist_overrides(run, data_root, "parallel.ep_size=1"))
    result = json.loads((run / "metrics.json").read_text())
    assert result["num_processes"] == 2 and result["ep_size"] == 1
    assert_same_run(result, reference_run, 3)


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, data_root):
    """`accelerate launch --multi_gpu --num_processes 2` with ep_size 2: two experts per rank."""
    run = tmp_path_factory.mktemp("ep2") / "run"
    accelerate_launch(2, mnist_overrides(run, data_root, "parallel.ep_size=2"))
    return run


@pytest.mark.multiprocess
def test_accelerate_two_ranks_ep2_train_like_one_process(ep2_run, reference_run):
    result = json.loads((ep2_run / "metrics.json").read_text())
    assert result["num_processes"] == 2 and result["ep_size"] == 2
    assert_same_run(result, reference_run, 3)


def _checkpoint_holds_all_experts_by_global_id(run: Path, reference_run_dir: Path | None = None):
    from moe_dist.train.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints")["model"]
    for key, value in state.items():
        if key.startswith("experts."):
            assert value.shape[0] == E, key
    # distinct experts: a renumbered or duplicated expert would show as equal slices
    w = state["experts.fc1.weight"]
    assert all(not torch.allclose(w[i], w[j]) for i in range(E) for j in range(i + 1, E))
    return state


@pytest.mark.multiprocess
def test_ep2_checkpoint_loads_in_one_process(ep2_run, data_root, tmp_path, reference_run):
    """The ep_size 2 checkpoint evaluates identically in one process, and resuming it there
    (weights and Adam moments by global expert id) continues the single-process trajectory."""
    from moe_dist.config import load_config
    from moe_dist.train.checkpoint import load_checkpoint
    from moe_dist.train.build import build_trainer

    _checkpoint_holds_all_experts_by_global_id(ep2_run)
    saved = json.loads((ep2_run / "metrics.json").read_text())
    backup = tmp_path / "backup"
    shutil.copytree(ep2_run, backup)
    try:
        cfg = load_config(None, mnist_overrides(ep2_run, data_root, "parallel.ep_size=1"))
        trainer = build_trainer(cfg)
        trainer.load_model_state(load_checkpoint(ep2_run / "checkpoints")["model"])
        metrics = trainer.evaluate()
        assert metrics["error"] == saved["test_error"]
        assert metrics["loss"] == pytest.approx(saved["test_loss"], rel=1e-6)
        assert metrics["selection_table"] == saved["selection_table"]
        assert metrics["mutual_information"] == pytest.approx(saved["mutual_information"], rel=1e-9)
        resumed = train_in_process(mnist_overrides(ep2_run, data_root, "parallel.ep_size=1", "train.epochs=4"))
        assert_same_run(resumed, reference_run, 4)
    finally:
        shutil.rmtree(ep2_run)
        shutil.copytree(backup, ep2_run)


def ep4_worker(rank: int, world: int, run_dir: str, out_dir: str, overrides: list[str]) -> None:
    from moe_dist.config import load_config
    from moe_dist.train.checkpoint import load_checkpoint
    from moe_dist.train.build import build_trainer

    trainer = build_trainer(load_config(None, overrides + ["parallel.ep_size=4"]))
    assert trainer.ctx.world_size == 4 and len(trainer.model.experts.parameters().__next__()) == 1
    trainer.load_model_state(load_checkpoint(Path(run_dir) / "checkpoints")["model"])
    metrics = trainer.evaluate()
    resumed = build_trainer(load_config(None, overrides + ["parallel.ep_size=4", "train.epochs=4"])).fit()
    if rank == 0:
        (Path(out_dir) / "ep4.json").write_text(json.dumps({"eval": metrics, "resumed": resumed}))


@pytest.mark.multiprocess
def test_ep2_checkpoint_loads_at_ep4(ep2_run, data_root, tmp_path, reference_run):
    """The same checkpoint on 4 ranks with one expert each: identical evaluation, and a
    resumed epoch that matches the single-process run."""
    saved = json.loads((ep2_run / "metrics.json").read_text())
    backup = tmp_path / "backup"
    shutil.copytree(ep2_run, backup)
    try:
        spawn(ep4_worker, 4, str(ep2_run), str(tmp_path), mnist_overrides(ep2_run, data_root))
    finally:
        shutil.rmtree(ep2_run)
        shutil.copytree(backup, ep2_run)
    result = json.loads((tmp_path / "ep4.json").read_text())
    metrics = result["eval"]
    assert metrics["error"] == saved["test_error"]
    assert metrics["loss"] == pytest.approx(saved["test_loss"], rel=1e-6)
    assert metrics["selection_table"] == saved["selection_table"]
    assert result["resumed"]["num_processes"] == 4 and result["resumed"]["ep_size"] == 4
    assert_same_run(result["resumed"], reference_run, 4)


# ----------------------------------------------------------------------------- unit tests


def test_world_info_from_launcher_variables():
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    info = world_info_from_env(torchrun_env)
    assert (info.rank, info.world_size, info.local_rank, info.node_rank, info.launcher) == (3, 4, 1, 1, "torchrun")
    deepspeed_env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2"}
    assert world_info_from_env(deepspeed_env).node_rank == 1
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    info = world_info_from_env(slurm)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank,
            info.launcher) == (5, 8, 1, 4, 1, "slurm")
    # srun + torchrun: the workers' variables win over the launcher task's
    assert world_info_from_env({**slurm, **torchrun_env}).rank == 3
    mpi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert world_info_from_env(mpi).launcher == "mpi"
    assert world_info_from_env({}).world_size == 1
    with pytest.raises(ConfigError, match="outside"):
        world_info_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert first_slurm_host("gpu[07-08,11],cpu1") == "gpu07"
    assert first_slurm_host("node3") == "node3"


def test_slurm_rendezvous_is_exported(monkeypatch):
    from moe_dist.parallel.env import _export_rendezvous

    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[4-5]", "SLURM_JOB_ID": "123"}
    _export_rendezvous(world_info_from_env(env), env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "n4"
    assert env["MASTER_PORT"] == "20123"


def test_layout_errors_are_clear():
    check_layout(4, 2, 8)
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        check_layout(6, 4, 8)
    check_layout(4, 4, 6)  # uneven blocks 2 + 2 + 1 + 1 (tests/test_uneven_experts.py)
    with pytest.raises(ConfigError, match="parallel.ep_size=8 exceeds moe.num_experts=6"):
        check_layout(8, 8, 6)
    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        ParallelContext.create(ep_size=2, num_experts=4)
    ctx = ParallelContext(rank=3, world_size=4, ep_size=2)
    assert ctx.local_experts(8) == range(4, 8)


def test_local_dispatch_with_capacity_drops_and_reports():
    """Single process, capacity factor 1 with a gate that sends everything to expert 0:
    only ceil(1 * B / E) samples reach it, the rest are dropped (output 0) and counted."""
    model = make_model("topk_idle")
    model.gate.out.bias.data = torch.tensor([30.0, -30.0, -30.0, -30.0])
    model.capacity_factor = 1.0
    model.eval()
    x = make_batches(1, 8)[0][0]
    out = model(x)
    assert out.routing_stats == {"routed": 8, "dropped": 6, "expert_rows": 2, "padded_rows": 4 * 2}
    assert (out.output[2:] == 0).all() and (out.output[:2] > 0).all()
    model.capacity_factor = 0.0
    full = model(x)
    torch.testing.assert_close(full.output[:2], out.output[:2])
    assert full.routing_stats["dropped"] == 0


# ----------------------------------------------------------------------------- DeepSpeed
# Optional: skipped without DeepSpeed (pip install -e ".[deepspeed]"). Its CPU JIT builds are
# avoided (shm op disabled, torch Adam), each test run gets its own TORCH_EXTENSIONS_DIR.

ZERO_STAGES = (0, 1, 2)


def deepspeed_worker(rank: int, world: int, out_dir: str, overrides: list[str]) -> None:
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(out_dir) / "torch_extensions")
    from moe_dist.config import load_config
    from moe_dist.parallel.deepspeed_engine import import_deepspeed
    from moe_dist.train.build import build_trainer

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    peer = peer_check(rank)
    worst = torch.tensor([float(v) for v in peer.values()])
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)  # both ranks' checks
    peer = dict(zip(peer, worst.tolist()))
    results = {"peer": peer}
    for stage in ZERO_STAGES:
        cfg = load_config(None, overrides + ["engine=deepspeed", "parallel.ep_size=2",
                                             f"parallel.zero_stage={stage}", f"run_dir={out_dir}/zero{stage}"])
        results[f"zero{stage}"] = build_trainer(cfg).fit()
    if rank == 0:
        (Path(out_dir) / "deepspeed.json").write_text(json.dumps(results))


def peer_check(rank: int, tokens: int = 96) -> dict[str, float]:
    """Our top-k MoE and deepspeed.moe.layer.MoE (hidden 256, FFN experts, E = 8, k = 2,
    ep_size 2, dropless) with the same weights and routing: outputs and gradients."""
    import deepspeed

    from moe_dist.models import MoE
    from moe_dist.models.ffn import FFNExpert, FFNExpertBank
    from moe_dist.parallel import parallelize
    from moe_dist.parallel.deepspeed_engine import deepspeed_context

    hidden, ffn, experts, ep = 256, 1024, 8, 2
    torch.manual_seed(0)  # the same weights on every rank
    ours = MoE(FFNExpertBank.create(experts, hidden_size=hidden, ffn_size=ffn),
               torch.nn.Linear(hidden, experts, bias=False), routing="topk", top_k=2, output_kind="logits")
    ctx = deepspeed_context(ep, experts)
    parallelize(ours, ctx)
    theirs = deepspeed.moe.layer.MoE(hidden_size=hidden, expert=FFNExpert(hidden, ffn), num_experts=experts,
                                     ep_size=ep, k=2, drop_tokens=False, use_rts=False, min_capacity=0,
                                     top2_2nd_expert_sampling=False)
    theirs.set_deepspeed_parallelism()
    with torch.no_grad():
        theirs.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
        for mine, expert in zip(ours.experts.to_modules(), theirs.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(mine.state_dict())
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens
    x = torch.randn(tokens + 8 * rank, hidden, generator=g)  # unequal token counts
    cotangent = torch.randn(x.shape, generator=g)
    results = {}
    for name, layer in (("ours", ours), ("theirs", theirs)):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        y = out.output if name == "ours" else out[0]
        (y * cotangent).sum().backward()
        results[name] = {"y": y.detach(), "dx": xi.grad}
    bank = ours.experts
    their_experts = theirs.deepspeed_moe.experts.deepspeed_experts

    def rel(a, b):  # largest difference relative to the largest magnitude
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    return {
        "output": rel(results["ours"]["y"], results["theirs"]["y"]),
        "input_grad": rel(results["ours"]["dx"], results["theirs"]["dx"]),
        "gate_grad": rel(ours.gate.weight.grad, theirs.deepspeed_moe.gate.wg.weight.grad),
        "expert_grad": max(rel(bank.fc1.weight.grad[i], e.fc1.weight.grad) for i, e in enumerate(their_experts)),
        "routed_pairs_per_rank": x.shape[0] * 2,
    }


@pytest.mark.multiprocess
def test_deepspeed_engine_and_peer_layer(tmp_path, data_root, ep2_run, reference_run):
    """engine=deepspeed at ZeRO 0, 1 and 2 (ep_size 2, expert groups of their own) follows the
    accelerate engine's loss curve on the same seed; and our top-k dispatch equals
    deepspeed.moe.layer.MoE with the same weights where nothing is dropped."""
    pytest.importorskip("deepspeed")
    spawn(deepspeed_worker, 2, str(tmp_path), mnist_overrides(tmp_path / "unused", data_root))
    results = json.loads((tmp_path / "deepspeed.json").read_text())
    peer = results["peer"]
    for key in ("output", "input_grad", "gate_grad", "expert_grad"):
        assert peer[key] <= 1e-5, peer
    accelerate_result = json.loads((ep2_run / "metrics.json").read_text())
    for stage in ZERO_STAGES:
        result = results[f"zero{stage}"]
        assert result["engine"] == "deepspeed" and result["num_processes"] == 2
        assert_same_run(result, accelerate_result, 3)
        assert_same_run(result, reference_run, 3)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world,ep", VALID)
def test_capacity_factor_drops_like_one_process_per_share(equivalence_runs, world, ep):
    """With a capacity factor each rank keeps at most ceil(cf * B_r * K / E) pairs per expert
    (top-1 choices first) before dispatch: the outputs and drop counts equal one process
    running the same capacity rule on that rank's share."""
    out_dir, _ = equivalence_runs
    model = make_capacity_model()
    x = make_batches()[0][0]
    dropped = 0
    for rank in range(world):
        rec = torch.load(out_dir / f"w{world}_ep{ep}_capacity_rank{rank}.pt")
        ref = model(x[rank_slice(GLOBAL_BATCH, rank, world)])
        torch.testing.assert_close(rec["output"], ref.output.detach(), **TOL)
        assert rec["routing_stats"]["dropped"] == ref.routing_stats["dropped"]
        assert rec["routing_stats"]["routed"] == ref.routing_stats["routed"]
        dropped += rec["routing_stats"]["dropped"]
    assert dropped > 0


def test_trainer_logs_drop_rate_and_padding_with_a_capacity_factor(tmp_path):
    run = tmp_path / "run"
    result = train_in_process([f"run_dir={run}", "data.train_size=200", "data.test_size=100", "train.epochs=1",
                               "train.batch_size=50", "train.progress=false", "moe.num_experts=4",
                               "moe.routing=topk", "moe.top_k=2", "moe.capacity_factor=0.5"])
    record = result["history"][0]
    assert 0 < record["drop_rate"] < 1 and 0 <= record["padding_ratio"] < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    assert {"moe/drop_rate", "moe/padding_ratio"} <= set(events.Tags()["scalars"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("world,ep", [(w, ep) for w, ep in VALID if w == 4])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_a_rank_without_samples_neither_hangs_nor_changes_the_result(equivalence_runs, world, ep, routing):
    """A global batch of 3 on 4 ranks: the last rank holds nothing, yet joins every
    collective; outputs, the loss and every gradient equal one process on the 3 samples."""
    out_dir, _ = equivalence_runs
    x, y = (t[:SMALL_BATCH] for t in make_batches()[0])
    model = make_model(routing)
    torch.manual_seed(100)
    ref = model(x)
    total = losses.mixture_nll(ref.output, y) + sum(ref.aux_losses.values())
    total.backward()
    records = [torch.load(out_dir / f"w{world}_ep{ep}_{routing}_small_rank{r}.pt") for r in range(world)]
    assert records[-1]["output"].shape[0] == 0
    torch.testing.assert_close(torch.cat([r["output"] for r in records]), ref.output.detach(), **TOL)
    torch.testing.assert_close(records[0]["total"], total.detach(), **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(records[0]["grads"][name], p.grad, **TOL, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("world,ep", VALID)
def test_gate_and_gate_losses_stay_float32_under_bf16(equivalence_runs, world, ep):
    out_dir, _ = equivalence_runs
    for rank in range(world):
        dtypes = torch.load(out_dir / f"w{world}_ep{ep}_bf16_rank{rank}.pt")
        assert set(dtypes) == {"gate_probs", "output", "importance", "sample_similarity"}
        assert all(d == torch.float32 for d in dtypes.values()), dtypes


def test_ffn_bank_grouped_rows_equal_the_padded_bank_and_the_modules():
    """The FFN bank's ragged path (no padding; empty experts included) computes what the
    padded batch and the separate expert modules compute, gradients included."""
    from moe_dist.models.ffn import FFNExpertBank
    from moe_dist.parallel.dispatch import run_expert_batch

    torch.manual_seed(0)
    bank = FFNExpertBank.create(4, hidden_size=16, ffn_size=32)
    modules = bank.to_modules()
    expert_R = torch.tensor([2, 0, 2, 3, 0, 2, 3])  # expert 1 gets nothing
    x = torch.randn(len(expert_R), 16)
    cot = torch.randn(len(expert_R), 16)
    results = []
    for grouped in (True, False):
        bank.grouped_rows = grouped
        bank.zero_grad()
        out, computed = run_expert_batch(bank, x, expert_R)
        (out * cot).sum().backward()
        results.append((out.detach(), computed, {n: p.grad.clone() for n, p in bank.named_parameters()}))
    (out_g, rows_g, grads_g), (out_p, rows_p, grads_p) = results
    assert rows_g == 7 and rows_p == 4 * 3
    reference = torch.stack([modules[e](x[r:r + 1])[0][0] for r, e in enumerate(expert_R.tolist())])
    torch.testing.assert_close(out_g, reference, **TOL)
    torch.testing.assert_close(out_p, reference, **TOL)
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_p[name], **TOL)
    assert grads_g["fc1.weight"][1].abs().sum() == 0
