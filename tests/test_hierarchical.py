"""Hierarchical routing (moe.routing=hierarchical): the two-level routing math against a hand
computation, the MoE running only the chosen experts, expert parallelism against one process
(real gloo worlds, groups placed whole, an uneven split of 3 groups on 2 ranks), the metrics
of both levels on a known routing, and the config's one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_dist import losses
from moe_dist.config import LossConfig, ModelConfig, MoEConfig, load_config
from moe_dist.errors import ConfigError
from moe_dist.launch import LaunchPlan, preflight
from moe_dist.models import MoEOutput, build_model
from moe_dist.models.moe import hierarchical_route
from moe_dist.parallel import ParallelContext
from moe_dist.parallel.groups import expert_blocks
from moe_dist.train.evaluate import evaluate
from procs import spawn
from test_parallel import assert_matches_one_process, distributed_run, make_batches
from test_parallel import single_process_run as parallel_reference

STEPS = 3
GLOBAL_BATCH = 7  # 4 + 3 on 2 ranks, 2 + 2 + 2 + 1 on 4
# case -> (experts, groups, groups chosen, experts chosen per group, gate_weights)
CASES = {"g3": (6, 3, 1, 2, "probs"),     # 3 groups on 2 ranks: 2 + 1 groups (4 + 2 experts)
         "g4": (8, 4, 2, 1, "softmax")}   # two chosen groups: a sample may reach two ranks
# 3 groups on 2 ranks (uneven); 4 groups on 4 ranks, two chosen per sample (slow: 4 processes)
RUNS = (("g3", 2), pytest.param("g4", 4, marks=pytest.mark.slow))
ADAM = dict(lr=1e-3, eps=1e-4)  # as tests/test_uneven_experts.py: rounding stays rounding


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the routing math

def _route(p_g, p_eg, top_groups, top_k, gate_weights):
    """hierarchical_route on logits whose softmaxes are the given probabilities."""
    G = len(p_g[0])
    group = torch.tensor(p_g).log()
    expert = torch.tensor(p_eg).log().view(len(p_g), -1)
    assert expert.shape[1] % G == 0
    return hierarchical_route(group, expert, top_groups, top_k, gate_weights)


def test_route_weights_are_products_of_the_two_gates_by_hand():
    # sample 0: p(g) = (0.7, 0.3), p(e|g0) = (0.5, 0.3, 0.2), p(e|g1) = (0.1, 0.6, 0.3)
    # sample 1: p(g) = (0.4, 0.6), p(e|g0) = (0.9, 0.05, 0.05), p(e|g1) = (0.4, 0.35, 0.25)
    p_g = [[0.7, 0.3], [0.4, 0.6]]
    p_eg = [[0.5, 0.3, 0.2, 0.1, 0.6, 0.3], [0.9, 0.05, 0.05, 0.4, 0.35, 0.25]]
    r = _route(p_g, p_eg, top_groups=1, top_k=2, gate_weights="probs")
    expected_p = torch.tensor([[0.35, 0.21, 0.14, 0.03, 0.18, 0.09], [0.36, 0.02, 0.02, 0.24, 0.21, 0.15]])
    torch.testing.assert_close(r.probs_BE, expected_p)
    torch.testing.assert_close(r.probs_BE.sum(1), torch.ones(2))
    torch.testing.assert_close(r.group_probs_BG, torch.tensor(p_g))
    assert r.group_index_BJ.tolist() == [[0], [1]]
    # sample 1: group 1 wins (0.6), so expert 0 (p(e) 0.36, the flat argmax) is not chosen
    assert r.index_BK.tolist() == [[0, 1], [3, 4]]
    torch.testing.assert_close(r.weights_BK, torch.tensor([[0.35, 0.21], [0.24, 0.21]]))
    soft = _route(p_g, p_eg, top_groups=1, top_k=2, gate_weights="softmax")  # renormalised: sums to 1
    torch.testing.assert_close(soft.weights_BK, torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.4 / 0.75, 0.35 / 0.75]]))


def test_two_chosen_groups_order_their_experts_by_the_flattened_probability():
    p_g = [[0.4, 0.6]]
    p_eg = [[0.9, 0.05, 0.05, 0.4, 0.3, 0.3]]
    r = _route(p_g, p_eg, top_groups=2, top_k=1, gate_weights="probs")
    assert r.group_index_BJ.tolist() == [[1, 0]]  # groups by p(g)
    assert r.index_BK.tolist() == [[0, 3]]        # experts by p(e): 0.36 before 0.24
    torch.testing.assert_close(r.weights_BK, torch.tensor([[0.36, 0.24]]))
    soft = _route(p_g, p_eg, top_groups=2, top_k=1, gate_weights="softmax")  # groups sum to 1, one expert each
    torch.testing.assert_close(soft.weights_BK, torch.tensor([[0.4, 0.6]]))


def make_model(case: str, seed: int = 0, noise: str = "gaussian"):
    """An MNIST-architecture hierarchical MoE (no BatchNorm) with both gate losses; experts
    that differ by id, so an expert served from the wrong rank shows."""
    E, G, J, k, weights = CASES[case]
    torch.manual_seed(seed)
    moe = MoEConfig(num_experts=E, routing="hierarchical", num_groups=G, top_groups=J, top_k=k,
                    gate_weights=weights, noise=noise)
    model = build_model(ModelConfig(arch="mnist"), moe,
                        LossConfig(importance_weight=0.3, ls_beta=2.0, ls_gamma=1.0), 10, (1, 28, 28))
    with torch.no_grad():
        for p in model.experts.parameters():
            p.add_(0.05 * torch.arange(E, dtype=p.dtype).view(-1, *[1] * (p.dim() - 1)))
    return model


def test_the_moe_runs_the_chosen_experts_with_product_weights_and_regularises_p_e():
    model = make_model("g3", noise="none")
    x = torch.randn(9, 1, 28, 28)
    out = model(x)
    E, G = 6, 3
    M = E // G
    assert model.placement_unit == M
    assert out.gate_probs.shape == (9, E) and out.group_probs.shape == (9, G)
    torch.testing.assert_close(out.gate_probs.sum(1), torch.ones(9))
    torch.testing.assert_close(out.gate_probs.view(9, G, M).sum(-1), out.group_probs)
    # the chosen experts lie in the chosen group, the best first
    assert (out.expert_index // M == out.group_index).all()
    assert (out.gate_probs.gather(1, out.expert_index).diff(dim=1) <= 0).all()
    assert out.samples_per_expert.tolist() == torch.bincount(out.expert_index.flatten(), minlength=E).tolist()
    # output = sum over the chosen of p(g) p(e|g) y_e, against every expert run densely
    with torch.no_grad():
        y_EBC, _ = model.experts(x, shared=True)
    chosen_BKC = y_EBC[out.expert_index, torch.arange(9).unsqueeze(1)]
    weights_BK = out.gate_probs.gather(1, out.expert_index)
    torch.testing.assert_close(out.output, (weights_BK.unsqueeze(-1) * chosen_BKC).sum(1))
    torch.testing.assert_close(out.aux_losses["importance"], losses.importance_loss(out.gate_probs, 0.3))
    # probs weights: the task loss reaches both gates (a top-1 group would get none when renormalised)
    losses.mixture_nll(out.output, torch.arange(9) % 10).backward()
    assert model.gate.group.out.weight.grad.abs().sum() > 0
    assert model.gate.expert.out.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ expert parallelism

# Cases run in float64: at world 4 the experts' float32 kernels round the padded batches of
# four ranks and of one process differently, by up to 1.6e-5 relative in a gradient.
FLOAT64_CASES = {"g4"}


def case_batches(case: str) -> list:
    batches = make_batches(STEPS, GLOBAL_BATCH)
    return [(x.double(), y) for x, y in batches] if case in FLOAT64_CASES else batches


def case_model(case: str):
    model = make_model(case)
    return model.double() if case in FLOAT64_CASES else model


def equivalence_worker(rank: int, world: int, out_dir: str, case: str) -> None:
    from moe_dist.parallel import parallelize

    batches = case_batches(case)
    ctx = ParallelContext.create(ep_size=world, num_experts=CASES[case][0])
    model = parallelize(case_model(case), ctx)
    record = {"local_experts": model.experts.num_experts,
              **distributed_run(model, ctx, batches, rank, world, adam=ADAM)}
    torch.save(record, Path(out_dir) / f"w{world}_{case}_rank{rank}.pt")


@pytest.fixture(scope="module")
def equivalence_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hierarchical")


def run_both(out_dir: Path, case: str, world: int) -> tuple[list[dict], dict]:
    """Each rank's record of a gloo world of ``world`` ranks, and the one-process reference."""
    batches = case_batches(case)
    reference = parallel_reference(case, batches, make=case_model, adam=ADAM)
    spawn(equivalence_worker, world, str(out_dir), case)
    return [torch.load(out_dir / f"w{world}_{case}_rank{r}.pt") for r in range(world)], reference


@pytest.mark.multiprocess
@pytest.mark.parametrize("case, world", RUNS)
def test_expert_parallel_hierarchical_equals_one_process(equivalence_dir, case, world):
    """Outputs, L_cv, L_s, the loss, every gradient after one step and every parameter after
    three Adam steps equal one process on the global batch, with whole groups on each rank."""
    records, ref = run_both(equivalence_dir, case, world)
    E, G, J, k, _ = CASES[case]
    M = E // G
    assert [r["local_experts"] for r in records] == [len(b) for b in expert_blocks(E, world, M)]
    if case == "g3":
        assert [r["local_experts"] for r in records] == [4, 2]  # groups 2 + 1
    assert_matches_one_process(records, ref)
    assert sum(r["routing_stats"]["expert_rows"] for r in records) == GLOBAL_BATCH * J * k
    for rec in records:  # a group lives on one rank: at most J remote ranks per sample
        stats = rec["routing_stats"]
        assert stats["min_remote_rows"] <= J * rec["batch"]
        if J == 1:  # k rows per remote sample today; one once the dispatch sends a sample once per rank
            assert stats["min_remote_rows"] <= stats["remote_rows_sent"] <= k * stats["min_remote_rows"]


# ------------------------------------------------------------------ metrics at both levels

class _Known(torch.nn.Module):
    """A model whose routing is given: p(g) and p(e) one-hot on the chosen group and expert."""

    def __init__(self, experts, groups, num_experts, num_groups):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.experts, self.groups, self.E, self.G = experts, groups, num_experts, num_groups

    def forward(self, x):
        e = torch.tensor(self.experts)
        g = torch.tensor(self.groups)
        return MoEOutput(output=torch.nn.functional.one_hot(e % 10, 10).float(), output_kind="probs",
                         gate_probs=torch.nn.functional.one_hot(e, self.E).float(), expert_index=e.view(-1, 1),
                         group_probs=torch.nn.functional.one_hot(g, self.G).float(), group_index=g.view(-1, 1),
                         top_expert_output=torch.nn.functional.one_hot(e % 10, 10).float())


class _OneBatch:
    def __init__(self, y):
        self.y = y

    def batches(self, epoch):
        yield torch.zeros(len(self.y), 1), self.y, torch.arange(len(self.y))


def test_metrics_at_both_levels_on_a_known_routing():
    # classes 0, 0, 1, 1; groups 0, 0, 1, 1 (I(G;Y) = 1 bit); experts 0, 1, 2, 2 of 4 in 2 groups
    model = _Known(experts=[0, 1, 2, 2], groups=[0, 0, 1, 1], num_experts=4, num_groups=2)
    m = evaluate(model, _OneBatch(torch.tensor([0, 0, 1, 1])), 10, num_experts=4, num_groups=2)
    assert m["group_mutual_information"] == pytest.approx(1.0)
    assert m["group_usage_entropy"] == pytest.approx(1.0) and m["group_sample_entropy"] == pytest.approx(0.0)
    assert m["group_selection_table"] == [[2, 0] + [0] * 8, [0, 2] + [0] * 8]
    assert m["samples_per_group"] == [2, 2] and m["groups_used"] == 2
    assert m["group_soft_selection_table"][1][:2] == [0.0, 2.0]
    # the flattened experts: H_u of (1/4, 1/4, 1/2, 0) = 1.5 bits; I(E;Y) = 1.5 + 1 - 1.5 = 1 bit
    assert m["usage_entropy"] == pytest.approx(1.5) and m["mutual_information"] == pytest.approx(1.0)
    assert m["selection_table"][2][:2] == [0, 2] and m["experts_used"] == 3
    flat = evaluate(model, _OneBatch(torch.tensor([0, 0, 1, 1])), 10, num_experts=4)
    assert not any(k.startswith("group") or k.endswith("_group") for k in flat)


def test_a_hierarchical_run_summary_shows_both_levels():
    from moe_dist.paper import format_summary

    cfg = load_config(None, ["data.name=fashion_mnist", "model.arch=fmnist", "moe.routing=hierarchical",
                             "moe.num_experts=4", "moe.num_groups=2"])
    text = format_summary(cfg, {"test_error": 0.1, "mutual_information": 1.2, "group_mutual_information": 0.9,
                                "group_usage_entropy": 1.0})
    lines = text.splitlines()
    assert any(line.split()[:2] == ["group_mutual_information", "0.9000"] for line in lines)
    assert len({len(line.rstrip()) for line in lines[2:]}) == 1  # one column, however long the name


# ------------------------------------------------------------------ the config's rules

HIER = ["data.name=fashion_mnist", "model.arch=fmnist", "moe.routing=hierarchical", "moe.num_experts=20",
        "moe.num_groups=4"]


@pytest.mark.parametrize("overrides, message", [
    (HIER[:-1] + ["moe.num_groups=3"], "moe.num_groups=3 must divide moe.num_experts=20 (groups of equal size)"),
    (HIER + ["moe.num_groups=0"], "moe.num_groups=0 must be a positive integer"),
    (HIER + ["moe.top_groups=5"], "moe.top_groups=5 must be in 1..moe.num_groups=4"),
    (HIER + ["moe.top_k=6"], "moe.top_k=6 must be in 1..5 under moe.routing='hierarchical' (experts per group: "
                             "moe.num_experts=20 / moe.num_groups=4)"),
    (HIER + ["moe.routing=topk"], "moe.num_groups=4 applies to moe.routing='hierarchical' only "
                                  "(moe.routing='topk'): leave it at 1"),
    (["moe.top_groups=2"], "moe.top_groups=2 applies to moe.routing='hierarchical' only"),
    (HIER + ["moe.gate_weights=raw"], "moe.gate_weights='raw' is not defined for moe.routing='hierarchical' "
                                      "(allowed: softmax, probs)"),
    (["moe.gate_weights=probs"], "moe.gate_weights='probs' is not defined for moe.routing='dense' (allowed: softmax)"),
    (HIER + ["parallel.ep_size=5"], "parallel.ep_size=5 exceeds moe.num_groups=4: a group of experts lives on one rank"),
    (HIER[:-2] + ["moe.num_experts=12", "moe.num_groups=6", "parallel.ep_size=4", "engine=deepspeed"],
     "engine=deepspeed with moe.routing='hierarchical' needs parallel.ep_size=4 to divide moe.num_groups=6"),
])
def test_bad_hierarchical_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_launch_preflight_refuses_more_ranks_than_groups_before_starting():
    plan = LaunchPlan(device="cpu", num_processes=8, overrides=tuple(HIER + ["parallel.ep_size=8"]))
    with pytest.raises(ConfigError, match="parallel.ep_size=8 exceeds moe.num_groups=4"):
        preflight(plan)
    assert preflight(LaunchPlan(device="cpu", num_processes=4, overrides=tuple(HIER + ["parallel.ep_size=4"]))) == 4


def test_a_moe_built_without_a_config_checks_the_group_rules():
    bad = MoEConfig(num_experts=6, routing="hierarchical", num_groups=4)
    with pytest.raises(ConfigError, match="moe.num_groups=4 must divide moe.num_experts=6"):
        build_model(ModelConfig(arch="mnist"), bad, LossConfig(), 10, (1, 28, 28))
    model = make_model("g3")
    from moe_dist.models.moe import MoE

    with pytest.raises(ValueError, match="HierarchicalGate"):
        MoE(model.experts, model.gate.expert, routing="hierarchical", num_groups=3)
