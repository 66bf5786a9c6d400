"""Unit tests for moe_dist.losses: each loss against a direct, loop-based definition.

Shape legend: B samples, C classes, E experts, D flattened input features,
R rows of a block of the distance matrix, G global batch.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.losses import (
    combine_similarity_terms,
    gram32_error_bound,
    importance_loss,
    importance_loss_from_importance,
    logits_cross_entropy,
    mixture_nll,
    normalize_distances,
    sample_distances,
    sample_similarity_loss,
    sample_similarity_terms,
    similarity_terms,
)

DT = torch.float64


# ------------------------------------------------------------------------- task losses


def test_mixture_nll_matches_nll_of_log_probs():
    torch.manual_seed(0)
    probs_BC = torch.softmax(torch.randn(7, 4, dtype=DT), dim=1)
    probs_BC[0] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=DT)  # log(0 + eps) on a wrong label
    labels_B = torch.tensor([1, 0, 3, 2, 2, 1, 0])
    expected = F.nll_loss(torch.log(probs_BC + 1e-7), labels_B)
    assert torch.allclose(mixture_nll(probs_BC, labels_B), expected, rtol=1e-12)
    assert torch.isclose(mixture_nll(probs_BC[:1], labels_B[:1]), torch.tensor(-math.log(1e-7), dtype=DT))


def test_mixture_nll_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mixture_nll"):
        mixture_nll(torch.rand(3, 2), torch.tensor([0, 1]))


def test_logits_cross_entropy_plain_and_double_softmax():
    torch.manual_seed(1)
    logits_BC = torch.randn(6, 2, dtype=DT)
    labels_B = torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(logits_cross_entropy(logits_BC, labels_B), F.cross_entropy(logits_BC, labels_B))
    double = logits_cross_entropy(logits_BC, labels_B, double_softmax=True)
    # Two classes: the double-softmax loss is ln(1 + e^(1 - 2 p_y)) (docs/papers.md B.2).
    p_y = torch.softmax(logits_BC, 1).gather(1, labels_B[:, None]).squeeze(1)
    assert torch.allclose(double, torch.log1p(torch.exp(1 - 2 * p_y)).mean())
    # Its floor at a perfect prediction is ln(1 + e^-1) = 0.3133.
    perfect = logits_cross_entropy(torch.tensor([[100.0, -100.0]], dtype=DT), torch.tensor([0]), True)
    assert abs(float(perfect) - 0.31326) < 1e-5


# ------------------------------------------------------------------------ L_importance


def test_importance_loss_hand_computed():
    gate_probs_BE = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.25, 0.25, 0.5]], dtype=DT)
    # importance = (1, 1, 1): perfectly balanced.
    assert float(importance_loss(gate_probs_BE, 3.0)) == pytest.approx(0.0, abs=1e-15)
    gate_probs_BE = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=DT)
    # importance = (2, 1, 0): mean 1, unbiased variance ((1 + 0 + 1) / 2) = 1, so CV^2 = 1.
    assert float(importance_loss(gate_probs_BE, 0.1)) == pytest.approx(0.1)
    # importance = (3, 1): mean 2, unbiased variance 2, CV^2 = 2 / 4.
    assert float(importance_loss_from_importance(torch.tensor([3.0, 1.0], dtype=DT), 2.0)) == pytest.approx(1.0)


def test_importance_loss_single_expert_is_zero_and_finite():
    probs_BE = torch.ones(4, 1, dtype=DT, requires_grad=True)
    loss = importance_loss(probs_BE, 1.0)
    (grad,) = torch.autograd.grad(loss, probs_BE)
    assert loss.item() == 0.0 and torch.isfinite(grad).all()


def test_importance_loss_from_importance_equals_sum_over_shards():
    torch.manual_seed(2)
    probs_BE = torch.softmax(torch.randn(10, 4, dtype=DT), 1)
    shards = [probs_BE[:3].sum(0), probs_BE[3:].sum(0)]
    assert torch.allclose(importance_loss_from_importance(sum(shards), 0.5), importance_loss(probs_BE, 0.5))


# ----------------------------------------------------------------------------- L_s


def naive_terms(dist_BB, probs_BE):
    """Direct definition of docs/papers.md A.2.2 steps 4-5: a loop over i, j, e, e'."""
    B, E = probs_BE.shape
    same = probs_BE.new_zeros(())
    diff = probs_BE.new_zeros(())
    for i, j in itertools.product(range(B), range(B)):
        for e, f in itertools.product(range(E), range(E)):
            term = dist_BB[i, j] * probs_BE[i, e] * probs_BE[j, f]
            if e == f:
                same = same + term / E
            else:
                diff = diff + term / (E * E - E)
    return same, diff


def naive_loss(x_BD, probs_BE, beta, gamma, variant, squared):
    x_BD = x_BD.reshape(x_BD.shape[0], -1)
    B = x_BD.shape[0]
    dist_BB = torch.zeros(B, B, dtype=DT)
    for i, j in itertools.product(range(B), range(B)):
        d = torch.sqrt(((x_BD[i] - x_BD[j]) ** 2).sum())
        dist_BB[i, j] = d * d if squared else d
    if dist_BB.max() > 0:
        dist_BB = dist_BB / dist_BB.max()
    same, diff = naive_terms(dist_BB, probs_BE)
    if variant == "reference":
        return beta * same - gamma * diff / B**2
    return (beta * same - gamma * diff) / B**2


@pytest.mark.parametrize("E", [1, 2, 5])
@pytest.mark.parametrize("variant", ["normalized", "reference"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalised_rows", [True, False])
def test_sample_similarity_loss_matches_double_loop(E, variant, squared, normalised_rows):
    torch.manual_seed(10 * E + squared)
    B = 5
    x_BD = torch.randn(B, 2, 3, dtype=DT)  # flattened to D = 6
    logits_BE = torch.randn(B, E, dtype=DT)
    # Rows that do not sum to 1 check that T uses the actual row sums.
    probs_BE = torch.softmax(logits_BE, 1) if normalised_rows else torch.rand(B, E, dtype=DT)
    probs_BE.requires_grad_(True)
    beta, gamma = 0.7, 1.3
    ours = sample_similarity_loss(x_BD, probs_BE, beta, gamma, variant=variant, squared=squared)
    ref = naive_loss(x_BD, probs_BE, beta, gamma, variant, squared)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-14)
    (g_ours,) = torch.autograd.grad(ours, probs_BE)
    (g_ref,) = torch.autograd.grad(ref, probs_BE)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-14)


def test_default_variant_is_normalized_and_terms_are_pair_means():
    torch.manual_seed(3)
    x_BD = torch.randn(4, 3, dtype=DT)
    probs_BE = torch.softmax(torch.randn(4, 3, dtype=DT), 1)
    dist_BB = normalize_distances(sample_distances(x_BD))
    S, T = similarity_terms(dist_BB, probs_BE, probs_BE)
    assert torch.allclose(sample_similarity_loss(x_BD, probs_BE, 1.0, 0.0), S / 16)
    assert torch.allclose(sample_similarity_loss(x_BD, probs_BE, 0.0, 1.0), -T / 16)
    assert torch.allclose(sample_similarity_loss(x_BD, probs_BE, 1.0, 0.0, variant="reference"), S)
    # A precomputed distance matrix gives the same loss.
    assert torch.allclose(
        sample_similarity_loss(None, probs_BE, 0.3, 0.2, dist_BB=dist_BB),
        sample_similarity_loss(x_BD, probs_BE, 0.3, 0.2),
    )


def test_single_expert_has_no_different_expert_term():
    x_BD = torch.randn(4, 3, dtype=DT)
    probs_BE = torch.ones(4, 1, dtype=DT, requires_grad=True)
    S, T = similarity_terms(normalize_distances(sample_distances(x_BD)), probs_BE, probs_BE)
    assert T.item() == 0.0 and S.item() > 0.0
    loss = sample_similarity_loss(x_BD, probs_BE, 0.0, 5.0)
    (grad,) = torch.autograd.grad(loss, probs_BE)
    assert loss.item() == 0.0 and torch.isfinite(grad).all()


def test_identical_samples_give_zero_loss_and_finite_gradient():
    x_BD = torch.ones(6, 10, dtype=DT)
    probs_BE = torch.softmax(torch.randn(6, 3, dtype=DT), 1).requires_grad_(True)
    for variant in ("normalized", "reference"):
        loss = sample_similarity_loss(x_BD, probs_BE, 1.0, 1.0, variant=variant)
        (grad,) = torch.autograd.grad(loss, probs_BE)
        assert loss.item() == 0.0
        assert torch.isfinite(grad).all() and float(grad.abs().max()) == 0.0


def test_inputs_get_no_gradient_and_distances_are_exact():
    x_BD = torch.randn(5, 4, dtype=DT, requires_grad=True)
    dist_BB = sample_distances(x_BD)
    assert not dist_BB.requires_grad
    assert torch.equal(dist_BB.diagonal(), torch.zeros(5, dtype=DT))
    direct = (x_BD[:, None, :] - x_BD[None, :, :]).pow(2).sum(-1).sqrt()
    assert torch.allclose(dist_BB, direct.detach(), rtol=1e-12)
    assert torch.allclose(sample_distances(x_BD, squared=True), direct.detach() ** 2, rtol=1e-12)


def hard_float32_batch_RD():
    """Samples that make the float32 Gram expansion fail: a large common offset,
    near-duplicates a few ulps apart, exact duplicates and the zero vector."""
    g = torch.Generator().manual_seed(5)
    base_RD = 1000.0 + torch.randn(6, 50, generator=g)
    near_RD = base_RD[:3] + 1e-3 * torch.randn(3, 50, generator=g)
    tiny_RD = base_RD[3:4].clone()
    tiny_RD[0, 7] = torch.nextafter(tiny_RD[0, 7], torch.tensor(float("inf")))
    return torch.cat([base_RD, near_RD, tiny_RD, base_RD[:2], torch.zeros(1, 50), torch.randn(4, 50, generator=g)])


@pytest.mark.parametrize("method", ["gram64", "gram32"])
@pytest.mark.parametrize("squared", [False, True])
def test_gram64_distances_are_exact_to_float32_resolution(squared, method):
    """gram64, and gram32 on a batch this hard (it falls back to gram64)."""
    x_RD = hard_float32_batch_RD()
    exact_RR = torch.cdist(x_RD.double(), x_RD.double(), compute_mode="donot_use_mm_for_euclid_dist")
    if squared:
        exact_RR = exact_RR**2
    ours_RR = sample_distances(x_RD, squared=squared, method=method)
    assert ours_RR.dtype == torch.float32
    zero = exact_RR == 0
    assert torch.equal(ours_RR[zero], torch.zeros_like(ours_RR[zero]))  # duplicates and diagonal
    assert zero.sum() > x_RD.shape[0]
    rel = (ours_RR.double() - exact_RR).abs()[~zero] / exact_RR[~zero]
    assert float(rel.max()) <= 2.0**-24 + 2.0**-29
    # The plain float32 expansion is badly wrong on this batch, so the guard is doing work.
    expansion_RR = torch.cdist(x_RD, x_RD, compute_mode="use_mm_for_euclid_dist").double()
    exact_dist_RR = exact_RR.sqrt() if squared else exact_RR
    assert float((expansion_RR - exact_dist_RR).abs().max()) > 1e-3
    # The reference method agrees to float32 accumulation error.
    ref_RR = sample_distances(x_RD, squared=squared, method="cdist")
    assert torch.allclose(ref_RR.double(), exact_RR, rtol=1e-5, atol=0)


def test_gram64_block_rows_match_full_matrix():
    x_GD = hard_float32_batch_RD()
    full_GG = sample_distances(x_GD, method="gram64")
    # Both are exact to float32 resolution, whatever blocking the BLAS picks per shape.
    block_RG = sample_distances(x_GD[5:9], x_GD, method="gram64")
    assert torch.allclose(block_RG, full_GG[5:9], rtol=2.0**-22, atol=0)
    with pytest.raises(ValueError, match="allowed values: gram32, gram64, cdist"):
        sample_distances(x_GD, method="mm")


def test_gram64_identical_batch_chunks_and_zero_loss():
    x_BD = torch.full((70, 3, 4), 0.3)  # 4900 pairs to redo: more than one chunk
    assert torch.equal(sample_distances(x_BD), torch.zeros(70, 70))
    probs_BE = torch.softmax(torch.randn(70, 3), 1).requires_grad_(True)
    loss = sample_similarity_loss(x_BD, probs_BE, 1.0, 1.0)
    (grad,) = torch.autograd.grad(loss, probs_BE)
    assert loss.item() == 0.0 and float(grad.abs().max()) == 0.0


# ------------------------------------------------- gram32 on real images (tests/data MNIST)


@pytest.fixture(scope="module")
def mnist_images(data_root):
    from moe_dist.data import load_dataset

    return load_dataset("mnist10k", data_root).train.x  # (8000, 1, 28, 28), normalised


def real_batch_RD(images, D, count=160):
    """``count`` real images as rows (D = 784), or CIFAR-like rows of three padded images
    (D = 3,072), followed by exact duplicates, near-duplicates a few ulps or 1e-3 apart, a
    close pair (an image plus 2% of another) and a large common offset."""
    g = torch.Generator().manual_seed(D)
    channels = 1 if D == 784 else 3
    x = images[torch.randperm(len(images), generator=g)[:count * channels]]
    if channels == 3:
        x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    base_RD = x.reshape(count, D)
    ulp_RD = base_RD[3:4].clone()
    ulp_RD[0, 100] = torch.nextafter(ulp_RD[0, 100], torch.tensor(float("inf")))
    near_RD = base_RD[:3] + 1e-3 * torch.randn(3, D, generator=g)
    close_RD = base_RD[4:5] + 0.02 * base_RD[5:6]
    offset_RD = 50.0 + base_RD[6:8]
    return torch.cat([base_RD, base_RD[:4], ulp_RD, near_RD, close_RD, offset_RD, offset_RD[:1]])


def exact_distances(x_RD, x_GD, squared):
    exact = torch.cdist(x_RD.double(), x_GD.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return exact**2 if squared else exact


@pytest.mark.parametrize("D", [784, 3072])
@pytest.mark.parametrize("squared", [False, True])
def test_gram32_on_real_images_is_within_its_bound_and_exact_for_near_duplicates(
        mnist_images, D, squared):
    x_RD = real_batch_RD(mnist_images, D)
    exact_RR = exact_distances(x_RD, x_RD, squared)
    ours_RR = sample_distances(x_RD, squared=squared)
    assert ours_RR.dtype == torch.float32
    zero = exact_RR == 0
    assert torch.equal(ours_RR[zero], torch.zeros_like(ours_RR[zero]))  # diagonal, duplicates
    assert int(zero.sum()) == len(x_RD) + 2 * 5
    rel_RR = (ours_RR.double() - exact_RR).abs() / exact_RR.masked_fill(zero, 1.0)
    # Near-duplicates (distance far below the norms) are recomputed: float32 resolution.
    centred = x_RD.double() - x_RD.double().mean(0)
    norms_R = (centred * centred).sum(1)
    sq_RR = exact_RR if squared else exact_RR**2
    close = sq_RR < (norms_R[:, None] + norms_R[None, :]) / 16
    assert int(close.sum()) > len(x_RD) + 2 * 8  # the near-duplicate pairs are there
    assert float(rel_RR[close].max()) <= 2.0**-23
    bound = gram32_error_bound(D) if squared else gram32_error_bound(D) / 2 + 2.0**-24
    assert float(rel_RR.max()) <= bound
    assert float(rel_RR.max()) < 1e-5  # what float32 products actually give on images
    # The float32 path ran (no fallback): its far pairs differ from gram64's in the last bits.
    assert not torch.equal(ours_RR, sample_distances(x_RD, squared=squared, method="gram64"))


def test_gram32_block_of_rows_against_the_batch(mnist_images):
    """The distributed shape: a rank's rows against the gathered batch, centred on its mean."""
    x_GD = real_batch_RD(mnist_images, 784)
    block_RG = sample_distances(x_GD[150:190], x_GD)
    exact_RG = exact_distances(x_GD[150:190], x_GD, squared=False)
    zero = exact_RG == 0
    assert torch.equal(block_RG[zero], torch.zeros_like(block_RG[zero]))
    assert int(zero.sum()) == 22 + 6  # the 22 rows themselves and 3 pairs of duplicates
    rel = (block_RG.double() - exact_RG).abs()[~zero] / exact_RG[~zero]
    assert float(rel.max()) < 1e-5
    assert torch.allclose(block_RG, sample_distances(x_GD)[150:190], rtol=2e-5, atol=0)


@pytest.mark.parametrize("method", ["gram32", "gram64"])
def test_features_constant_over_the_batch_are_dropped_without_changing_distances(
        mnist_images, method):
    """MNIST digits share background pixels: dropping them gives the same distances; a
    feature constant in the batch but not in the rows compared with it stays."""
    x_RD = mnist_images[:100].reshape(100, 784)
    constant_D = (x_RD == x_RD[0]).all(dim=0)
    assert 100 < int(constant_D.sum()) < 784
    ours_RR = sample_distances(x_RD, method=method)
    # Same products (up to the BLAS's memory-alignment-dependent summation order).
    assert torch.allclose(ours_RR, sample_distances(x_RD[:, ~constant_D], method=method), rtol=1e-6, atol=0)
    exact_RR = exact_distances(x_RD, x_RD, squared=False)
    assert torch.allclose(ours_RR.double(), exact_RR, rtol=1e-5, atol=0)
    rows_RD = x_RD[:7].clone()
    rows_RD[:, constant_D.nonzero()[0]] += 3.0  # a background pixel lit in these rows only
    block_RG = sample_distances(rows_RD, x_RD, method=method)
    assert torch.allclose(block_RG.double(), exact_distances(rows_RD, x_RD, False), rtol=1e-5, atol=0)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("variant", ["normalized", "reference"])
def test_gram32_loss_and_gradient_match_float64_reference_on_real_images(
        mnist_images, squared, variant):
    x_RD = real_batch_RD(mnist_images, 784)
    logits_BE = torch.randn(len(x_RD), 6, generator=torch.Generator().manual_seed(2))
    probs_BE = torch.softmax(logits_BE, 1).requires_grad_(True)
    probs64_BE = probs_BE.detach().double().requires_grad_(True)
    ours = sample_similarity_loss(x_RD, probs_BE, 0.7, 1.3, variant=variant, squared=squared)
    # Float64 reference: difference-kernel distances and the published loop over expert pairs.
    dist_BB = exact_distances(x_RD, x_RD, squared)
    dist_BB = dist_BB / dist_BB.max()
    B, E = probs64_BE.shape
    pair_sums = [[torch.sum(dist_BB * torch.outer(probs64_BE[:, e], probs64_BE[:, f])) for f in range(E)]
                 for e in range(E)]
    same = sum(pair_sums[e][e] for e in range(E)) / E
    diff = sum(pair_sums[e][f] for e in range(E) for f in range(E) if e != f) / (E * E - E)
    ref = combine_similarity_terms(same, diff, B, 0.7, 1.3, variant)
    assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=0)
    (g_ours,) = torch.autograd.grad(ours, probs_BE)
    (g_ref,) = torch.autograd.grad(ref, probs64_BE)
    assert torch.allclose(g_ours.double(), g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))


def test_gram32_uses_gram64_when_float32_products_cannot_be_trusted(mnist_images):
    x_RD = real_batch_RD(mnist_images, 784, count=80)[:80]  # plain images
    gram64_RR = sample_distances(x_RD, method="gram64")
    # Two crowds of near-duplicates, half the pairs close against the centred norms: more
    # than 1/64 to recompute, which would cost more than the float64 products.
    noise_RD = 1e-4 * torch.randn(80, 784, generator=torch.Generator().manual_seed(1))
    crowd_RD = x_RD[:2].repeat_interleave(40, dim=0) + noise_RD
    assert torch.equal(sample_distances(crowd_RD), sample_distances(crowd_RD, method="gram64"))
    # A matmul precision that allows TF32 or bfloat16 products voids the float32 bound.
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(sample_distances(x_RD), gram64_RR)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert not torch.equal(sample_distances(x_RD), gram64_RR)
    # Too many features for the bound (it grows with D), float32 norms that could overflow ...
    wide_RD = torch.randn(6, 9000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_distances(wide_RD), sample_distances(wide_RD, method="gram64"))
    huge_RD = x_RD * 1e18
    assert torch.equal(sample_distances(huge_RD), sample_distances(huge_RD, method="gram64"))
    # ... and norms so small (below 2^-87) that float32 underflow would enter the bound.
    tiny_RD = x_RD * 1e-30
    assert torch.equal(sample_distances(tiny_RD), sample_distances(tiny_RD, method="gram64"))
    assert gram32_error_bound(784) < gram32_error_bound(3072) < 2.0**-8 < gram32_error_bound(9000)


def test_symmetric_pair_sums_reuse_the_forward_product():
    """similarity_terms(symmetric=True): same S and T, same gradient as autograd's D^T G."""
    torch.manual_seed(8)
    x_BD = torch.randn(9, 5, dtype=DT)
    dist_BB = normalize_distances(sample_distances(x_BD))
    probs_BE = torch.softmax(torch.randn(9, 4, dtype=DT), 1).requires_grad_(True)
    fast = similarity_terms(dist_BB, probs_BE, probs_BE, symmetric=True)
    slow = similarity_terms(dist_BB, probs_BE, probs_BE)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    weights = (0.3, -1.7)
    g_fast = torch.autograd.grad(weights[0] * fast[0] + weights[1] * fast[1], probs_BE)[0]
    g_slow = torch.autograd.grad(weights[0] * slow[0] + weights[1] * slow[1], probs_BE)[0]
    assert torch.allclose(g_fast, g_slow, rtol=1e-12, atol=1e-15)


def test_invalid_variant_names_allowed_values():
    x_BD = torch.randn(3, 2)
    probs_BE = torch.softmax(torch.randn(3, 2), 1)
    with pytest.raises(ValueError, match="normalized.*reference"):
        sample_similarity_loss(x_BD, probs_BE, 1.0, 1.0, variant="paper")
    with pytest.raises(ValueError, match="normalized.*reference"):
        combine_similarity_terms(torch.tensor(0.0), torch.tensor(0.0), 3, 1.0, 1.0, variant="x")


@pytest.mark.parametrize("E", [1, 2, 5])
def test_block_decomposition_equals_full_batch(E):
    """Rows split over 'ranks' against the gathered batch sum to the full S, T and gradients."""
    torch.manual_seed(4 + E)
    G = 11
    x_GD = torch.randn(G, 7, dtype=DT)
    probs_GE = torch.softmax(torch.randn(G, E, dtype=DT), 1).requires_grad_(True)
    full_dist_GG = normalize_distances(sample_distances(x_GD))
    S_full, T_full = similarity_terms(full_dist_GG, probs_GE, probs_GE)
    loss_full = combine_similarity_terms(S_full, T_full, G, 0.4, 0.9)
    (g_full,) = torch.autograd.grad(loss_full, probs_GE)

    global_max = sample_distances(x_GD).max()  # all-reduce MAX over ranks in a real run
    S_sum = T_sum = 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 11)):
        dist_RG = normalize_distances(sample_distances(x_GD[rows], x_GD), global_max)
        S, T = sample_similarity_terms(dist_RG, probs_GE[rows], probs_GE)
        S_sum, T_sum = S_sum + S, T_sum + T
    assert torch.allclose(S_sum, S_full, rtol=1e-12) and torch.allclose(T_sum, T_full, rtol=1e-12)
    loss_blocks = combine_similarity_terms(S_sum, T_sum, G, 0.4, 0.9)
    (g_blocks,) = torch.autograd.grad(loss_blocks, probs_GE)
    assert torch.allclose(g_blocks, g_full, rtol=1e-12, atol=1e-15)


def test_similarity_terms_shape_checks():
    with pytest.raises(ValueError, match="does not match"):
        similarity_terms(torch.rand(3, 4), torch.rand(3, 2), torch.rand(5, 2))
    with pytest.raises(ValueError, match="experts"):
        similarity_terms(torch.rand(3, 4), torch.rand(3, 3), torch.rand(4, 2))


def test_float32_gates_with_float64_distances():
    x_BD = torch.randn(4, 3, dtype=DT)
    probs_BE = torch.softmax(torch.randn(4, 2), 1)
    loss = sample_similarity_loss(x_BD, probs_BE, 1.0, 1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
