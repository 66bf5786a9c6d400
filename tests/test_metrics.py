"""Unit tests for moe_dist.metrics: hand-computed cases and whole-set accumulation.

Shape legend: B samples, C classes, E experts, K clusters.
"""

import json
import math

import pytest
import torch

from moe_dist.metrics import (
    EvalAccumulator,
    dispatch_entropy,
    entropy_bits,
    mutual_information,
    sample_entropy,
    usage_entropy,
    usage_entropy_from_mean,
)

LOG2_5 = math.log2(5)


# ----------------------------------------------------------------------- entropies


def test_sample_entropy_uniform_and_one_hot():
    assert sample_entropy(torch.full((7, 5), 0.2)) == pytest.approx(LOG2_5)
    one_hot_BE = torch.eye(5)[[0, 3, 3, 1]]
    assert sample_entropy(one_hot_BE) == 0.0  # 0 * log 0 = 0, not NaN


def test_sample_entropy_is_mean_of_per_sample_entropies():
    gate_probs_BE = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert sample_entropy(gate_probs_BE) == pytest.approx(0.5)  # (1 bit + 0 bits) / 2


def test_usage_entropy_of_mean_gate():
    one_hot_BE = torch.eye(5)  # each expert once: mean gate is uniform
    assert usage_entropy(one_hot_BE) == pytest.approx(LOG2_5)
    assert usage_entropy(torch.eye(5)[[2, 2, 2]]) == 0.0
    assert usage_entropy_from_mean(torch.tensor([0.5, 0.25, 0.25, 0.0])) == pytest.approx(1.5)


def test_entropy_bits_along_dim():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert torch.allclose(entropy_bits(p, dim=1), torch.tensor([1.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------- mutual information


def test_mutual_information_diagonal_independent_and_empty():
    assert mutual_information(torch.eye(5) * 13) == pytest.approx(LOG2_5)
    assert mutual_information(torch.full((4, 5), 7.0)) == pytest.approx(0.0, abs=1e-12)
    # Independent but non-uniform: outer product of marginals.
    independent_CE = torch.outer(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([3.0, 1.0]))
    assert mutual_information(independent_CE) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.zeros(3, 4)) == 0.0
    assert mutual_information([[0, 0], [0, 0]]) == 0.0


def test_mutual_information_hand_computed():
    # Two classes, two experts: class 0 always expert 0; class 1 split evenly.
    counts_CE = [[2, 0], [1, 1]]
    # P = [[.5, 0], [.25, .25]]; H(Y) = 1, H(E) = H(.75, .25), H(E,Y) = 1.5.
    h_e = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert mutual_information(counts_CE) == pytest.approx(1.0 + h_e - 1.5)


def test_mutual_information_rejects_bad_input():
    with pytest.raises(ValueError):
        mutual_information(torch.ones(3))
    with pytest.raises(ValueError):
        mutual_information([[1, -1]])


# --------------------------------------------------------------- dispatch entropy


def test_dispatch_entropy_mixed_pure_and_empty():
    assert dispatch_entropy(torch.full((4, 8), 10.0)) == pytest.approx(math.log(4))  # nats
    pure_KE = torch.zeros(4, 8)
    pure_KE[0, 0], pure_KE[1, 1], pure_KE[2, 5], pure_KE[3, 7] = 5, 9, 2, 4
    assert dispatch_entropy(pure_KE) == 0.0
    assert dispatch_entropy(torch.zeros(4, 8)) == 0.0


def test_dispatch_entropy_hand_computed_weighting():
    # Expert 0: 2 + 2 samples (H = ln 2), expert 1: 4 samples of one cluster (H = 0), expert 2 empty.
    counts_KE = [[2, 4, 0], [2, 0, 0]]
    assert dispatch_entropy(counts_KE) == pytest.approx(0.5 * math.log(2))


# ---------------------------------------------------------------- EvalAccumulator


def make_eval_set(n=103, E=5, C=4, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels_B = torch.randint(0, C, (n,), generator=g)
    output_BC = torch.softmax(torch.randn(n, C, generator=g) * 2, 1)
    gate_probs_BE = torch.softmax(torch.randn(n, E, generator=g) * 3, 1)
    gate_probs_BE[:4] = torch.eye(E)[:4] if E >= 4 else gate_probs_BE[:4]  # exact zeros
    pred_B = torch.randint(0, C, (n,), generator=g)
    clusters_B = torch.randint(0, K, (n,), generator=g)
    losses_B = torch.rand(n, generator=g, dtype=torch.float64)
    return labels_B, output_BC, gate_probs_BE, pred_B, clusters_B, losses_B


def test_accumulator_over_batches_equals_metrics_on_whole_set():
    E, C, K = 5, 4, 3
    labels_B, output_BC, gate_probs_BE, pred_B, clusters_B, losses_B = make_eval_set(E=E, C=C, K=K)
    acc = EvalAccumulator(E, C, num_clusters=K)
    # Uneven batches, including a short last one: the reference code's H_u used only that.
    for lo, hi in [(0, 32), (32, 64), (64, 96), (96, 103)]:
        acc.update(
            labels_B[lo:hi], output_BC[lo:hi], gate_probs_BE[lo:hi],
            top_expert_pred_B=pred_B[lo:hi], clusters_B=clusters_B[lo:hi],
            loss_sum=float(losses_B[lo:hi].sum()),
        )
    res = acc.compute()
    json.dumps(res, allow_nan=False)  # JSON-serialisable, no NaN

    expert_B = gate_probs_BE.argmax(1)
    correct_B = output_BC.argmax(1) == labels_B
    n = labels_B.numel()
    hard_CE = torch.zeros(C, E)
    soft_CE = torch.zeros(C, E, dtype=torch.float64)
    pred_CE = torch.zeros(C, E)
    cluster_KE = torch.zeros(K, E)
    for i in range(n):
        hard_CE[labels_B[i], expert_B[i]] += 1
        soft_CE[labels_B[i]] += gate_probs_BE[i].double()
        pred_CE[pred_B[i], expert_B[i]] += 1
        cluster_KE[clusters_B[i], expert_B[i]] += 1

    assert res["num_samples"] == n
    assert res["accuracy"] == pytest.approx(float(correct_B.double().mean()))
    assert res["error"] == pytest.approx(1 - res["accuracy"])
    assert res["loss"] == pytest.approx(float(losses_B.mean()))
    assert res["sample_entropy"] == pytest.approx(sample_entropy(gate_probs_BE))
    assert res["usage_entropy"] == pytest.approx(usage_entropy(gate_probs_BE))
    assert res["usage_entropy"] != pytest.approx(usage_entropy(gate_probs_BE[96:]))
    assert res["mutual_information"] == pytest.approx(mutual_information(hard_CE))
    assert res["mutual_information_predicted"] == pytest.approx(mutual_information(pred_CE))
    assert res["selection_table"] == hard_CE.t().long().tolist()
    assert torch.allclose(torch.tensor(res["soft_selection_table"], dtype=torch.float64), soft_CE.t())
    assert res["samples_per_expert"] == hard_CE.sum(0).long().tolist()
    for e in range(E):
        mask = expert_B == e
        expected = float(correct_B[mask].double().mean()) if mask.any() else None
        assert res["per_expert_accuracy"][e] == pytest.approx(expected)
    assert res["experts_used"] == int((hard_CE.sum(0) > 0.01 * n).sum())
    assert res["dispatch_entropy"] == pytest.approx(dispatch_entropy(cluster_KE))


def assert_close_results(a, b):
    """Recursive comparison of compute() results: exact for ints and None, close for floats."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close_results(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_results(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    else:
        assert a == b and type(a) is type(b)


def test_accumulator_state_is_summable_across_ranks():
    """Two 'ranks' with their own shards, buffers summed as an all-reduce would, equal one."""
    E, C = 5, 4
    labels_B, output_BC, gate_probs_BE, pred_B, _, _ = make_eval_set(E=E, C=C, seed=1)
    single = EvalAccumulator(E, C)
    single.update(labels_B, output_BC, gate_probs_BE, top_expert_pred_B=pred_B)
    ranks = [EvalAccumulator(E, C), EvalAccumulator(E, C)]
    ranks[0].update(labels_B[:50], output_BC[:50], gate_probs_BE[:50], top_expert_pred_B=pred_B[:50])
    ranks[1].update(labels_B[50:], output_BC[50:], gate_probs_BE[50:], top_expert_pred_B=pred_B[50:])
    total = [a + b for a, b in zip(ranks[0].state_tensors(), ranks[1].state_tensors())]
    for rank in ranks:
        for mine, summed in zip(rank.state_tensors(), total):
            mine.copy_(summed)  # in place, as dist.all_reduce does
    assert_close_results(ranks[0].compute(), single.compute())
    assert len(single.state_tensors()) == 1 and single.state_tensors()[0].dtype == torch.float64


def test_accumulator_single_model_has_no_moe_keys():
    acc = EvalAccumulator(num_experts=0, num_classes=3)
    acc.update(torch.tensor([0, 1, 2]), torch.eye(3)[[0, 1, 1]], loss_sum=1.5)
    res = acc.compute()
    assert set(res) == {"num_samples", "accuracy", "error", "loss"}
    assert res["accuracy"] == pytest.approx(2 / 3) and res["loss"] == pytest.approx(0.5)


def test_accumulator_top_expert_index_and_empty_experts():
    """Top-k routing passes the chosen expert; unused experts give None accuracies, not NaN."""
    acc = EvalAccumulator(num_experts=3, num_classes=2, num_clusters=2)
    labels_B = torch.tensor([0, 0, 1, 1])
    output_BC = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    acc.update(labels_B, output_BC, expert_index_B=torch.tensor([0, 0, 2, 2]),
               clusters_B=torch.tensor([0, 0, 1, 1]))
    res = acc.compute()
    assert res["selection_table"] == [[2, 0], [0, 0], [0, 2]]
    assert res["per_expert_accuracy"] == [0.5, None, 1.0]
    assert res["samples_per_expert"] == [2, 0, 2]
    assert res["experts_used"] == 2
    assert res["mutual_information"] == pytest.approx(1.0)
    assert res["dispatch_entropy"] == 0.0
    # No gate probabilities or expert predictions: those metrics are absent, not None.
    for key in ("sample_entropy", "usage_entropy", "soft_selection_table",
                "mutual_information_predicted"):
        assert key not in res
    json.dumps(res, allow_nan=False)


def test_accumulator_empty_and_reset():
    acc = EvalAccumulator(2, 2)
    assert acc.compute() == {"num_samples": 0, "accuracy": None, "error": None, "loss": None}
    # A rank with an empty shard still joins the all-reduce; its update is a no-op.
    acc.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0, 2),
               top_expert_pred_B=torch.zeros(0, dtype=torch.long))
    assert float(acc.state_tensors()[0].abs().sum()) == 0.0
    acc.update(torch.tensor([1]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]))
    assert acc.compute()["usage_entropy"] == pytest.approx(1.0)
    acc.reset()
    assert acc.compute()["num_samples"] == 0


def test_accumulator_validates_inputs():
    acc = EvalAccumulator(2, 3)
    with pytest.raises(ValueError, match="labels"):
        acc.update(torch.tensor([3]), torch.rand(1, 3))
    with pytest.raises(ValueError, match="gate_probs"):
        acc.update(torch.tensor([0]), torch.rand(1, 3), torch.rand(1, 4))
    with pytest.raises(ValueError, match="num_clusters"):
        acc.update(torch.tensor([0]), torch.rand(1, 3), torch.rand(1, 2), clusters_B=torch.tensor([0]))
