"""Bytes sent per training step under expert parallelism (moe_dist.parallel.traffic) against
what the layout says must travel, on 2 real gloo processes.

One spawned job: (a) the paper's MNIST vanilla MoE (dense, E = 5, uneven blocks 3 + 2) trained
for one epoch at ep_size 2 by the trainer, whose metrics.json must report the analytic bytes
per step; (b) one training step of a top-2 MNIST MoE, whose dispatch bytes must follow from
its routing statistics (the rows each rank sent and got back).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_dist.config import LossConfig, ModelConfig, MoEConfig, load_config
from moe_dist.models import build_model
from procs import spawn
from test_parallel import loss_share, make_batches, rank_slice

REPO = Path(__file__).resolve().parent.parent
E, BLOCKS = 5, (3, 2)  # experts 0-2 on rank 0, 3-4 on rank 1
D, C, K = 28 * 28, 10, 2  # input features, expert outputs (class probabilities), top-k
TRAIN, BATCH = 400, 100  # 4 steps of 50 + 50 samples
TOPK_BATCH = 9  # 5 + 4: uneven shares
F32 = 4


def vanilla(run_dir: Path, root: str):
    return load_config(REPO / "configs" / "mnist" / "vanilla.yaml", [
        f"run_dir={run_dir}", "data.name=mnist10k", f"data.root={root}", f"data.train_size={TRAIN}",
        "data.test_size=100", f"train.batch_size={BATCH}", "train.eval_batch_size=100", "train.epochs=1",
        "train.progress=false", "train.num_threads=1", "parallel.ep_size=2"])


def topk_model():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=E, routing="topk", top_k=K, noise="gaussian")
    return build_model(ModelConfig(arch="mnist"), moe, LossConfig(importance_weight=0.3), 10, (1, 28, 28))


def worker(rank: int, world: int, run_dir: str, root: str, out_dir: str) -> None:
    from moe_dist.parallel import GradientReducer, ParallelContext, parallelize, traffic
    from moe_dist.train.build import build_trainer

    result = build_trainer(vanilla(Path(run_dir), root)).fit()
    # (b) one top-k training step, counted around it
    ctx = ParallelContext.create(ep_size=world, num_experts=E)
    model = parallelize(topk_model(), ctx)
    x, y = make_batches(1, TOPK_BATCH)[0]
    mine = rank_slice(TOPK_BATCH, rank, world)
    before = traffic.SENT.snapshot()
    torch.manual_seed(100)
    out = model(x[mine])
    loss_share(out, y[mine], TOPK_BATCH)[0].backward()
    GradientReducer(model, ctx)()
    record = {"metrics": result, "topk_sent": traffic.SENT.since(before), "topk_stats": out.routing_stats}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def traffic_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("traffic")
    spawn(worker, 2, str(out / "run"), data_root, str(out))
    return out


@pytest.fixture(scope="module")
def records(traffic_run):
    return [json.loads((traffic_run / f"rank{r}.json").read_text()) for r in range(2)]


def replicated_bytes(model) -> tuple[int, int]:
    """(bytes, count) of the parameters every rank holds (all but the experts')."""
    params = [p for n, p in model.named_parameters() if not n.startswith("experts.")]
    return sum(p.numel() * p.element_size() for p in params), len(params)


@pytest.mark.multiprocess
def test_dense_run_reports_the_analytic_bytes_per_step(records):
    """metrics.json's comm_bytes_per_step for the dense MNIST MoE at ep_size 2, per rank r
    (the other rank o, B_r = B_o = 50 samples per step, L = 3 + 2 local experts):

    dispatch = B_r * D * 4        forward all-gather: rank r's images to the other rank
             + B_o * L_r * C * 4  forward all-to-all: r's experts' outputs for o's samples
             + B_r * L_o * C * 4  backward: the gradients of the outputs r received, back to o
    (the images need no gradient: the all-gather has no backward). Both ranks send
    50 * 784 * 4 + (50 * 3 + 50 * 2) * 10 * 4 = 166,800 bytes.

    gradients = the replicated (gate) parameters' float32 gradients plus one presence flag per
    parameter (grads.all_reduce_gradients), all-reduced: the ring model's 2 (P - 1) / P = 1 x.
    other = the batch layout (one int64 to the other rank) + the loss and its nll part (2
    float32, all-reduced) + the preemption flag (one int64, all-reduced) = 8 + 8 + 8.
    """
    metrics = records[0]["metrics"]
    assert records[1]["metrics"]["comm_bytes_per_step"] == metrics["comm_bytes_per_step"]
    half = BATCH // 2
    dispatch = [half * D * F32 + (half * BLOCKS[r] + half * BLOCKS[1 - r]) * C * F32 for r in (0, 1)]
    assert dispatch == [166_800, 166_800]
    grad_bytes, grad_params = replicated_bytes(build_model(ModelConfig(arch="mnist"), MoEConfig(num_experts=E),
                                                           LossConfig(), 10, (1, 28, 28)))
    expected = {"dispatch": sum(dispatch) / 2, "gradients": grad_bytes + F32 * grad_params, "other": 24}
    expected["total"] = sum(expected.values())
    assert metrics["comm_bytes_per_step"] == expected
    assert metrics["steps"] == TRAIN // BATCH and metrics["num_processes"] == 2


@pytest.mark.multiprocess
def test_dense_run_logs_the_bytes_per_step_to_tensorboard(traffic_run, records):
    """One epoch: perf/comm_bytes_per_step/{kind} at step 1 holds metrics.json's values."""
    events = EventAccumulator(str(traffic_run / "run"), size_guidance={"scalars": 0})
    events.Reload()
    for kind, value in records[0]["metrics"]["comm_bytes_per_step"].items():
        assert [(e.step, e.value) for e in events.Scalars(f"perf/comm_bytes_per_step/{kind}")] == [(1, value)], kind


@pytest.mark.multiprocess
def test_topk_dispatch_bytes_follow_the_routing_statistics(records):
    """Top-2 at ep_size 2 (weights travel with each row; rows and weights come back summed, one
    per unit). With R_r = remote_rows_sent (rank r's rows sent to the other rank), G_r =
    remote_rows_returned (rows the other rank sends back to r) and R_o the other rank's:

    forward:  R_r * (D + K) * 4 (rows and their K gate weights)  +  R_o * C * 4 (o's rows, back)
    backward: R_o * K * 4 (the gate weights' gradients)  +  G_r * C * 4 (the returned rows')
    (the images need no gradient: the rows have no backward)."""
    stats = [r["topk_stats"] for r in records]
    assert sum(s["remote_rows_sent"] for s in stats) > 0  # something crossed
    for r, rec in enumerate(records):
        mine, other = stats[r], stats[1 - r]
        assert mine["remote_rows_returned"] == mine["remote_rows_sent"]  # one row back per unit
        R_r, R_o, G_r = mine["remote_rows_sent"], other["remote_rows_sent"], mine["remote_rows_returned"]
        expected = R_r * (D + K) * F32 + R_o * C * F32 + R_o * K * F32 + G_r * C * F32
        assert rec["topk_sent"]["dispatch"] == expected, r
        grad_bytes, grad_params = replicated_bytes(topk_model())
        assert rec["topk_sent"]["gradients"] == grad_bytes + F32 * grad_params
