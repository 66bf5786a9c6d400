"""Training losses of the two papers: mixture NLL, cross-entropy, L_importance and L_s.

Shape legend (suffixes on tensor names):

    B  samples in the batch (one process)
    C  classes
    E  experts (all experts of the MoE, not only this rank's)
    D  flattened input features (pixels of the normalised, transformed image); the
       distance matrix of L_s is always called ``dist_*``, never D, in code
    R  rows: the samples this rank owns in a distributed L_s (R = B on one process)
    G  the global batch gathered over data-parallel ranks (G = B on one process)

Everything here is a pure function of tensors: no ``torch.distributed`` calls. The
distributed callers in ``moe_dist.parallel`` reduce the pieces that this module exposes
(``importance_E`` for L_importance, the partial sums ``(S, T)`` for L_s) and finish with the
same functions, so that N ranks give the loss and gradients of one process on the
concatenated batch (docs/design.md, choice 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moe_dist.config import CHOICES, check_choice

__all__ = [
    "SIMILARITY_VARIANTS",
    "mixture_nll",
    "mixture_nll_sum",
    "logits_cross_entropy",
    "logits_cross_entropy_sum",
    "task_loss",
    "model_loss",
    "importance_loss",
    "importance_loss_from_importance",
    "DISTANCE_METHODS",
    "gram32_error_bound",
    "sample_distances",
    "normalize_distances",
    "similarity_terms",
    "sample_similarity_terms",
    "combine_similarity_terms",
    "sample_similarity_loss",
]

#: Allowed values of ``variant`` in :func:`sample_similarity_loss` (config key ``loss.ls_variant``).
SIMILARITY_VARIANTS = CHOICES["loss.ls_variant"]


# --------------------------------------------------------------------------- task losses


def mixture_nll(probs_BC: torch.Tensor, labels_B: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Mean over the batch of ``-log(probs[label] + eps)``.

    The experts of Krishnamurthy et al. end in a softmax and the MoE mixes *probabilities*,
    ``y = sum_e p_e * y_e`` (docs/papers.md A.1.6), so the loss is the NLL of the log of the
    mixture, with the reference code's ``eps = 1e-7`` guarding ``log(0)``. The single model of
    that paper uses the same loss on its softmax output.
    """
    if probs_BC.dim() != 2 or labels_B.shape != probs_BC.shape[:1]:
        raise ValueError(
            f"mixture_nll expects probs (B, C) and labels (B,), got {tuple(probs_BC.shape)} "
            f"and {tuple(labels_B.shape)}"
        )
    return mixture_nll_sum(probs_BC, labels_B, eps) / len(labels_B)


def mixture_nll_sum(probs_BC: torch.Tensor, labels_B: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``sum_b -log(probs[b, label_b] + eps)``: the per-sample losses summed (a rank may hold
    no sample of a batch, so shares are sums; /B gives the mean bit for bit)."""
    picked_B = probs_BC.gather(1, labels_B.long().unsqueeze(1)).squeeze(1)
    return -torch.log(picked_B + eps).sum()


def logits_cross_entropy(
    logits_BC: torch.Tensor, labels_B: torch.Tensor, double_softmax: bool = False
) -> torch.Tensor:
    """Cross-entropy of logits; ``double_softmax=True`` reproduces Chen et al.'s MoE loss.

    Chen et al.'s MoE code applies a softmax to the gated logits and feeds the result to
    ``nn.CrossEntropyLoss``, which applies log-softmax again (docs/papers.md B.2, FLAG-BUG). For
    two classes that loss is ``ln(1 + e^(1 - 2 p_y))``, bounded below by 0.3133, and the
    published early-stopping threshold (loss <= 0.314, B.3) only makes sense with it. The
    default is the plain cross-entropy the paper describes.
    """
    return logits_cross_entropy_sum(logits_BC, labels_B, double_softmax) / len(labels_B)


def logits_cross_entropy_sum(logits_BC: torch.Tensor, labels_B: torch.Tensor,
                             double_softmax: bool = False) -> torch.Tensor:
    """:func:`logits_cross_entropy` summed over the samples instead of averaged."""
    if double_softmax:
        logits_BC = torch.softmax(logits_BC, dim=1)
    return F.cross_entropy(logits_BC, labels_B.long(), reduction="sum")


def task_loss(output_BC: torch.Tensor, output_kind: str, labels_B: torch.Tensor, kind: str = "auto",
              batch_size: int | None = None) -> torch.Tensor:
    """The task loss of a batch, or of a rank's share of a global batch: the per-sample losses
    summed over ``labels_B`` and divided by ``batch_size`` (the global batch; default
    ``len(labels_B)``, the mean). One formula in one process and across ranks, so N ranks'
    shares sum to the single-process loss.

    ``kind``: mixture_nll (experts that output probabilities, Krishnamurthy et al.),
    cross_entropy or double_softmax (logits, Chen et al.), auto (by ``output_kind``).
    """
    if kind == "auto":
        kind = "mixture_nll" if output_kind == "probs" else "cross_entropy"
    if kind == "mixture_nll" and output_kind != "probs":
        raise ValueError("loss.kind='mixture_nll' needs experts that output probabilities")
    if kind == "mixture_nll":
        total = mixture_nll_sum(output_BC, labels_B)
    else:
        total = logits_cross_entropy_sum(output_BC.float(), labels_B, double_softmax=kind == "double_softmax")
    return total / (len(labels_B) if batch_size is None else batch_size)


def model_loss(out, labels_B: torch.Tensor, kind: str = "auto",
               batch_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss a model is trained on, and its parts: the task loss (``nll``, :func:`task_loss`)
    plus the weighted gate losses of a :class:`~moe_dist.models.moe.MoEOutput`
    (``out.aux_losses``: L_cv, L_s; under several ranks already this rank's shares)."""
    main = task_loss(out.output, out.output_kind, labels_B, kind, batch_size)
    parts = {"nll": main, **out.aux_losses}
    return main + sum(out.aux_losses.values(), torch.zeros((), device=main.device)), parts


# ------------------------------------------------------------------------- L_importance


def importance_loss_from_importance(importance_E: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * (std(importance) / mean(importance))**2`` from per-expert importances.

    Split out so that a data-parallel caller can sum ``importance_E`` over ranks with a
    differentiable all-reduce first and obtain the global-batch loss (docs/design.md, choice 4).
    ``torch.std`` is the unbiased (E - 1) estimator over the experts, as in the reference
    code (docs/papers.md A.2.1). With one expert the coefficient of variation is undefined
    (``torch.std`` would return NaN); the loss is then 0: there is nothing to balance.
    """
    if importance_E.dim() != 1:
        raise ValueError(f"importance must have shape (E,), got {tuple(importance_E.shape)}")
    if importance_E.numel() < 2:
        return importance_E.sum() * 0.0
    cv = importance_E.std() / importance_E.mean()
    return weight * cv * cv


def importance_loss(gate_probs_BE: torch.Tensor, weight: float) -> torch.Tensor:
    """L_importance of Shazeer et al. as coded by Krishnamurthy et al. (docs/papers.md A.2.1).

    ``importance_e = sum over the batch of p_e(x)``; the loss is ``weight * CV(importance)**2``
    with the unbiased standard deviation over experts.
    """
    if gate_probs_BE.dim() != 2:
        raise ValueError(f"gate_probs must have shape (B, E), got {tuple(gate_probs_BE.shape)}")
    return importance_loss_from_importance(gate_probs_BE.sum(dim=0), weight)


# ---------------------------------------------------------------------------------- L_s


#: Methods of :func:`sample_distances`.
DISTANCE_METHODS = ("gram32", "gram64", "cdist")

# Pairs recomputed from explicit differences per chunk (bounds the memory at about
# 16 * chunk * D bytes when a batch holds many identical samples).
_PAIR_CHUNK = 1024

# "gram32" recomputes exactly every pair whose squared distance is at most this fraction of
# |a'|^2 + |b'|^2 (centred norms, the cancellation ratio of the pair): there the float32
# rounding, which scales with the norms, is not small against the distance. 1/8 leaves about
# 150 of the 131,000 pairs of a Fashion-MNIST batch of 512 (1/4: 1,900; 1/16: 10).
_GRAM32_RATIO = 1.0 / 8

# Above this fraction of pairs to recompute (e.g. a batch of near-identical samples) "gram32"
# computes the float64 Gram matrix instead: recomputing one pair from its differences costs
# about as much as 30 float64 Gram entries.
_GRAM32_MAX_REDO = 1.0 / 64

# "gram32" is used while its worst-case relative error on a squared distance stays below this
# (up to about 8,000 features); beyond, "gram64".
_GRAM32_MAX_ERROR = 2.0**-8


def _redo_from_differences(out_RG: torch.Tensor, a_RD: torch.Tensor, b_GD: torch.Tensor,
                           redo_P2: torch.Tensor, squared: bool, same: bool) -> None:
    """Write the distances of the pairs ``redo_P2`` into ``out_RG``, from explicit
    differences in float64: each is exact (or within 2^-53 relative when the two values
    differ in magnitude by over 2^29), so identical samples get exactly 0, and the norm
    has a relative error of about D * 2^-53. With ``same`` (``b_GD is a_RD``) the pairs
    are (i, j) with i < j and each is written to both (i, j) and (j, i)."""
    for chunk in redo_P2.split(_PAIR_CHUNK):
        rows, cols = chunk[:, 0], chunk[:, 1]
        diff = a_RD.index_select(0, rows).to(torch.float64)
        dist = torch.linalg.vector_norm(diff.sub_(b_GD.index_select(0, cols)), dim=1)
        values = (dist.square_() if squared else dist).to(out_RG.dtype)
        out_RG[rows, cols] = values
        if same:
            out_RG[cols, rows] = values


def _expansion(norms_RG: torch.Tensor, a_RD: torch.Tensor, b_GD: torch.Tensor,
               same: bool) -> torch.Tensor:
    """``norms_RG - 2 a b^T``: a plain matrix product, then one addition per entry
    (``-2 a.b`` is an exact scaling, so each entry is rounded once after the product), so
    that the error bounds of the callers hold whatever order the BLAS sums in. With ``same``
    (``b_GD is a_RD``) the matrix is symmetric: the upper rows and the lower right block
    are multiplied and the lower left block is the transpose of the upper right, 3/4 of
    the products."""
    R = a_RD.shape[0]
    if not same or R < 64:
        gram_RG = torch.mm(a_RD, b_GD.t())
    else:
        h = R // 2
        gram_RG = torch.empty_like(norms_RG)
        torch.mm(a_RD[:h], a_RD.t(), out=gram_RG[:h])
        gram_RG[h:, h:] = torch.mm(a_RD[h:], a_RD[h:].t())
        gram_RG[h:, :h] = gram_RG[:h, h:].t()
    return torch.add(norms_RG, gram_RG, alpha=-2.0, out=gram_RG)


def _gram64_squared_distances(a_RD: torch.Tensor, b_GD: torch.Tensor,
                              same: bool = False) -> torch.Tensor:
    """Squared distances in float64 from the Gram matrix, with ill-conditioned pairs redone.

    ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` in float64 (:func:`_expansion`). Any summation order
    bounds the rounding error of each dot product by ``D * u * |a| |b|`` (u = 2^-53), so the
    error of a squared distance is below ``(2 D + 4) * u * (|a|^2 + |b|^2)``. Pairs whose
    squared distance is not above 2^30 times that bound (near-duplicates) are recomputed
    from explicit differences. Every entry therefore has a relative error below 2^-30, far
    under float32 resolution (2^-24), and identical samples get exactly 0. With ``same``
    (``b_GD is a_RD``) the diagonal is set to 0, the distance of a sample to itself.
    """
    a64_RD = a_RD.to(torch.float64)
    b64_GD = a64_RD if same else b_GD.to(torch.float64)
    na_R = (a64_RD * a64_RD).sum(dim=1)
    nb_G = na_R if same else (b64_GD * b64_GD).sum(dim=1)
    norms_RG = na_R[:, None] + nb_G[None, :]
    sq_RG = _expansion(norms_RG, a64_RD, b64_GD, same).clamp_min_(0.0)
    bound_scale = (2 * a64_RD.shape[1] + 4) * 2.0**-53 * 2.0**30
    redo_RG = sq_RG <= norms_RG.mul_(bound_scale)
    if same:  # the upper triangle: (j, i) gets the value of (i, j)
        sq_RG.diagonal().zero_()
        redo_RG.triu_(1)
    _redo_from_differences(sq_RG, a_RD, b_GD, redo_RG.nonzero(), squared=True, same=same)
    return sq_RG


def gram32_error_bound(D: int) -> float:
    """Worst-case relative error of a squared distance that "gram32" takes from its float32
    Gram matrix (:func:`_gram32_distances`), for D features; about ``8 D 2^-24``
    (3.8e-4 at D = 784).

    With u = 2^-24, ``gamma_n = n u / (1 - n u)``, centred rows ``a' = fl(a - m)``,
    ``N = |a'|^2 + |b'|^2`` and ``s = fl(N32 - 2 fl(a'.b'))``, whatever the summation order:
    the dot product is off by at most ``gamma_D |a'| |b'| <= gamma_D N / 2``, so ``2 a'.b'``
    by ``gamma_D N``; ``N32`` (norms summed in float64, rounded to float32 and added) by
    ``2.01 u N``; the final addition by ``u |s| <= 2.01 u N``. Centring rounds each
    ``a - m`` once, which moves ``|a' - b'|^2`` from ``d^2 = |a - b|^2`` by at most
    ``4.01 u N``; float32 underflow adds at most ``2 D 2^-150`` absolute, under ``2^-45 N``
    for D <= 2^13, because batches with pairs of ``N < 2^-87`` go to "gram64". So
    ``|s - d^2| <= c N`` with ``c = gamma_D + 9 u``. A pair is kept only when
    ``s > N32 / 8``, hence ``|s - d^2| < 8.01 c s`` and the relative error on ``d^2`` is
    at most ``e = 8.01 c / (1 - 8.01 c)``. For a batch against itself only the entry
    (i, j), i < j, is tested: the entry (j, i) is the same dot product, also within
    ``c N`` of ``d^2``, and ``d^2 > (1 - 8.01 c) s_ij`` gives it the same bound.
    """
    u = 2.0**-24
    if D * u >= 0.01:  # no useful bound (and none at all from D = 2^24)
        return float("inf")
    c = D * u / (1.0 - D * u) + 9.0 * u
    k = 1.0015 / _GRAM32_RATIO * c  # 1.0015: N32 vs N, and the certified s vs N32
    return k / (1.0 - k)


def _gram32_distances(a_RD: torch.Tensor, b_GD: torch.Tensor, same: bool,
                      squared: bool) -> torch.Tensor:
    """Distances from a float32 Gram matrix of the centred batch, ill-conditioned pairs redone.

    Distances are translation invariant, so both sides are centred on the float32 mean of
    ``b_GD``, which makes ``N = |a'|^2 + |b'|^2`` as small as it gets and with it the
    cancellation. The squared distance ``s`` comes from :func:`_expansion` in float32; it is
    kept when ``s > N / 8`` (:data:`_GRAM32_RATIO`), with a relative error below
    :func:`gram32_error_bound` (3.8e-4 at D = 784, 1.5e-3 at D = 3,072; on the distance
    itself half of that, plus 2^-24). That is the worst case over any summation order; the
    errors seen on image batches are under 1e-5. Every other pair (near-duplicates,
    anything close against the norms) is recomputed in float64 from explicit differences
    (:func:`_redo_from_differences`) and is exact to float32 resolution; identical samples
    get exactly 0, and with ``same`` the diagonal is set to 0. When more than 1/64 of the
    pairs need recomputing, when a norm could overflow float32 (or is NaN), or when rows on
    both sides sit at the mean (norms below 2^-87, where float32 underflow would count),
    :func:`_gram64_squared_distances` computes them all.
    """
    mean_D = b_GD.mean(dim=0)
    ac_RD = a_RD - mean_D
    bc_GD = ac_RD if same else b_GD - mean_D
    na_R = _norms64(ac_RD)
    nb_G = na_R if same else _norms64(bc_GD)
    # |s| <= 2 N stays finite below 2^126 ("not <" also catches NaN and infinity). A pair with
    # N < 2^-87 (two rows at the mean) needs both norms below 2^-87; float32 underflow
    # would not be negligible there.
    tiny = 2.0**-87
    if not bool(torch.maximum(na_R.max(), nb_G.max()) < 2.0**124) or (
            bool((na_R < tiny).any()) and bool((nb_G < tiny).any())):
        return _gram64_fallback(a_RD, b_GD, same, squared)
    na32_R = na_R.to(torch.float32)
    nb32_G = na32_R if same else nb_G.to(torch.float32)
    norms_RG = na32_R[:, None] + nb32_G[None, :]
    sq_RG = _expansion(norms_RG, ac_RD, bc_GD, same)
    redo_RG = sq_RG <= norms_RG.mul_(_GRAM32_RATIO)
    if same:  # symmetric: redo (i, j), i < j, for both entries (see gram32_error_bound)
        redo_RG.triu_(1)
    redo_P2 = redo_RG.nonzero()
    if len(redo_P2) > _GRAM32_MAX_REDO * redo_RG.numel() / (2 if same else 1):
        return _gram64_fallback(a_RD, b_GD, same, squared)
    # Kept pairs have s > N / 8 > 0 and the others are overwritten: no clamp needed.
    dist_RG = sq_RG if squared else sq_RG.sqrt_()
    if same:
        dist_RG.diagonal().zero_()
    _redo_from_differences(dist_RG, a_RD, b_GD, redo_P2, squared, same)
    return dist_RG


def _norms64(x_RD: torch.Tensor) -> torch.Tensor:
    """Squared norms of the rows, summed in float64 (relative error about D * 2^-53)."""
    return torch.linalg.vector_norm(x_RD, dim=1, dtype=torch.float64).square_()


def _gram64_fallback(a_RD: torch.Tensor, b_GD: torch.Tensor, same: bool,
                     squared: bool) -> torch.Tensor:
    """The distances of :func:`_gram64_squared_distances`, in the dtype of ``a_RD``."""
    sq_RG = _gram64_squared_distances(a_RD, b_GD, same)
    return (sq_RG if squared else sq_RG.sqrt_()).to(a_RD.dtype)


def _drop_constant_features(a_RD: torch.Tensor, b_GD: torch.Tensor,
                            same: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples without the features that hold one value in every row of both sides
    (e.g. the background pixels that a batch of MNIST digits shares, a quarter of them at
    B = 512): they add exactly 0 to every distance, so dropping them changes no result and
    saves their share of the matrix product."""
    def spread(x_ND: torch.Tensor, ref_D: torch.Tensor) -> torch.Tensor:
        # A sum of absolute differences is 0 exactly when every term is (NaN, inf stay in).
        return (x_ND - ref_D).abs_().sum(dim=0)

    # The first rows rule out most features cheaply; only the rest are checked on all rows.
    ref_D = b_GD[0]
    first_D = spread(b_GD[:8], ref_D) + (0.0 if same else spread(a_RD[:8], ref_D))
    cand_C = (first_D == 0).nonzero().squeeze(1)
    if len(cand_C) == 0:
        return a_RD, b_GD
    b_GC = b_GD.index_select(1, cand_C)
    full_C = spread(b_GC, b_GC[0]) + (0.0 if same else spread(a_RD.index_select(1, cand_C), b_GC[0]))
    keep_D = torch.ones(b_GD.shape[1], dtype=torch.bool, device=b_GD.device)
    keep_D[cand_C[full_C == 0]] = False
    keep_K = keep_D.nonzero().squeeze(1)
    if len(keep_K) == len(keep_D):
        return a_RD, b_GD
    a_RD = a_RD.index_select(1, keep_K)
    return a_RD, (a_RD if same else b_GD.index_select(1, keep_K))


def _gram32_allowed(a_RD: torch.Tensor) -> bool:
    """float32 samples, few enough features for the bound, and float32 matrix products that
    really are float32 (TF32 or bfloat16 products, allowed by a matmul precision below
    "highest", would void the bound)."""
    return (a_RD.dtype == torch.float32
            and gram32_error_bound(a_RD.shape[1]) <= _GRAM32_MAX_ERROR
            and torch.get_float32_matmul_precision() == "highest"
            and not (a_RD.is_cuda and torch.backends.cuda.matmul.allow_tf32))


def sample_distances(
    x_RD: torch.Tensor, x_GD: torch.Tensor | None = None, squared: bool = False,
    method: str = "gram32",
) -> torch.Tensor:
    """Euclidean distances between flattened samples, ``dist_RG[i, j] = |x_i - x_j|``.

    The reference code uses ``torch.cdist`` without the matrix-multiply expansion
    (docs/papers.md A.2.2 step 2), because the float32 expansion ``|x|^2 + |y|^2 - 2 x.y``
    cancels badly for near-identical images and gives non-zero self-distances. The two Gram
    methods here use the expansion where it is safe and explicit differences where it is not:

    * ``"gram32"`` (default): the expansion of the centred batch in float32; a pair whose
      squared distance is at most 1/8 of its centred norms is recomputed in float64 from
      explicit differences (``_gram32_distances``). Self-distances and duplicates are
      exactly 0, near-duplicates exact to float32 resolution, every other distance within
      :func:`gram32_error_bound` / 2 + 2^-24 relative in the worst case (1.9e-4 at
      D = 784, 7.4e-4 at D = 3,072), a few float32 ulps (under 1e-5) on image batches. On
      CPU it costs about one float32 matrix product, 1.5 times less than "gram64" at
      B = 512, D = 784 (benchmarks/bench_ls.py). Non-float32 inputs, more than about
      8,000 features, or a matmul precision other than "highest" (TF32, bfloat16) use
      "gram64".
    * ``"gram64"``: the expansion in float64 (``_gram64_squared_distances``): every pair
      within 2^-30 relative before rounding, i.e. exact to float32 resolution.
    * ``"cdist"``: the reference code's ``torch.cdist(...,
      compute_mode="donot_use_mm_for_euclid_dist")`` in the input dtype.

    "gram32" and "gram64" first drop the features that hold one value over the whole batch
    (they add exactly 0 to every distance; ``_drop_constant_features``), so D in their
    bounds counts the features that vary.

    Float64 inputs use ``torch.cdist`` (difference kernel) in float64 under every method.
    When ``x_GD`` is omitted (or is ``x_RD``) the batch is compared with itself.

    ``squared=True`` gives the squared distance that the paper's text describes
    (A.2.2, FLAG-DISAGREE); the default follows the code.

    Inputs are detached: they are data, and L_s sends gradient only into the gate
    probabilities (A.2.2 step 7). Dimensions after the first are flattened. The result
    has the dtype of ``x_RD``.
    """
    if method not in DISTANCE_METHODS:
        raise ValueError(
            f"unknown distance method {method!r}; allowed values: {', '.join(DISTANCE_METHODS)}"
        )
    a_RD = x_RD.detach().reshape(x_RD.shape[0], -1)
    same = x_GD is None or x_GD is x_RD
    b_GD = a_RD if same else x_GD.detach().reshape(x_GD.shape[0], -1)
    if a_RD.shape[1] != b_GD.shape[1]:
        raise ValueError(
            f"samples have {a_RD.shape[1]} and {b_GD.shape[1]} features; they must match"
        )
    if method != "cdist" and a_RD.dtype != torch.float64 and a_RD.numel() and b_GD.numel():
        a_RD, b_GD = _drop_constant_features(a_RD, b_GD.to(a_RD.dtype), same)
        if method == "gram32" and _gram32_allowed(a_RD):
            return _gram32_distances(a_RD, b_GD, same, squared)
        return _gram64_fallback(a_RD, b_GD, same, squared)
    dist_RG = torch.cdist(
        a_RD, b_GD.to(a_RD.dtype), p=2.0, compute_mode="donot_use_mm_for_euclid_dist"
    )
    return dist_RG * dist_RG if squared else dist_RG


def normalize_distances(
    dist_RG: torch.Tensor, max_dist: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Divide distances by the largest distance in the batch (docs/papers.md A.2.2 step 3).

    ``max_dist`` defaults to ``dist_RG.max()``, which is right only when ``dist_RG`` covers the
    whole batch. A distributed caller holding a block of rows must pass the *global* maximum
    (an all-reduce with MAX over ranks), or each rank would scale its rows differently.
    When every distance is 0 (a batch of identical samples) the result is all zeros rather
    than 0/0 = NaN, so the loss is 0 with a zero, finite gradient.
    """
    if max_dist is None:
        max_dist = dist_RG.max()
    max_dist = torch.as_tensor(max_dist, dtype=dist_RG.dtype, device=dist_RG.device)
    return dist_RG / max_dist.clamp_min(torch.finfo(dist_RG.dtype).tiny)


class _SymmetricPairSums(torch.autograd.Function):
    """``(sum(P * (D P)), r^T D r)`` with ``r = P 1`` for a symmetric, constant D.

    Autograd would compute the gradient with a second B x B x E product, ``D^T G``. For a
    symmetric D both gradients follow from the forward's ``D P``: ``2 D P`` for the first
    sum and ``2 (D P) 1`` (that is ``2 D r``) in every column for the second, so the
    backward pass is three elementwise B x E operations and nothing B x B is read again.
    """

    @staticmethod
    def forward(ctx, dist_BB: torch.Tensor, probs_BE: torch.Tensor):
        dp_BE = dist_BB @ probs_BE  # sum_j D_ij p_e(j)
        dr_B = dp_BE.sum(dim=1)  # D r, since r = P 1
        ctx.save_for_backward(dp_BE, dr_B)
        return (probs_BE * dp_BE).sum(), (probs_BE.sum(dim=1) * dr_B).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_same: torch.Tensor, g_all: torch.Tensor):
        dp_BE, dr_B = ctx.saved_tensors
        return None, torch.addcmul((2.0 * g_all) * dr_B[:, None], dp_BE, 2.0 * g_same)


def _pair_sums(dist_RG: torch.Tensor, probs_rows_RE: torch.Tensor, probs_global_GE: torch.Tensor,
               symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(P_R * (D P_G))`` and ``r_R^T D r_G`` (``r = P 1``), by one (R x G) @ (G x E)
    product; :class:`_SymmetricPairSums` when ``symmetric`` allows it."""
    if symmetric and probs_rows_RE is probs_global_GE and not dist_RG.requires_grad:
        return _SymmetricPairSums.apply(dist_RG, probs_global_GE)
    dp_RE = dist_RG @ probs_global_GE  # sum_j D_ij p_e(j)
    # r_R^T D r_G = sum_i r_i * sum_j D_ij r_j, and D r_G is the row sum of D P_G.
    return (probs_rows_RE * dp_RE).sum(), (probs_rows_RE.sum(dim=1) * dp_RE.sum(dim=1)).sum()


def similarity_terms(
    dist_RG: torch.Tensor, probs_rows_RE: torch.Tensor, probs_global_GE: torch.Tensor,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-expert and different-expert sums of L_s for a block of rows of D.

    With ``P`` the gate matrix (rows = samples) and ``D`` the normalised distances
    (docs/papers.md A.2.2 steps 4-5), over rows ``i`` in R and columns ``j`` in G:

        S = 1/E       * sum_ij D_ij sum_e        p_e(i) p_e(j)  = 1/E       * sum(P_R * (D P_G))
        T = 1/(E^2-E) * sum_ij D_ij sum_{e != e'} p_e(i) p_e'(j) = 1/(E^2-E) * (r_R^T D r_G - E*S)

    where ``r = P 1`` are the actual row sums of P. Using them, rather than assuming that each
    row sums to exactly 1, keeps T exact for any P (e.g. float32 softmax rounding, or gates
    that are not normalised). This replaces the reference code's loop over the E^2 expert
    pairs by one (R x G) @ (G x E) product.

    The full-batch case is ``R = G`` (``probs_rows_RE is probs_global_GE``). For a
    distributed batch each rank passes its own rows of D against the gathered global batch
    and its own rows of P; summing ``(S, T)`` over ranks gives the full-batch values, and
    :func:`combine_similarity_terms` turns them into the loss. ``dist_RG`` must already be
    normalised with the global maximum (:func:`normalize_distances`). With E = 1 the
    different-expert term is undefined (E^2 - E = 0) and T is returned as 0.

    ``symmetric=True`` says that ``dist_RG`` is a symmetric matrix (the distances of the
    full batch, as :func:`sample_distances` returns them); with ``probs_rows_RE is
    probs_global_GE`` the backward pass then reuses the forward's ``D P`` instead of a
    second matrix product (:class:`_SymmetricPairSums`). The gradient assumes the symmetry.

    Returns ``(S, T)`` as 0-dim tensors that carry gradient into both P arguments.
    """
    R, G = dist_RG.shape
    if probs_rows_RE.dim() != 2 or probs_global_GE.dim() != 2:
        raise ValueError("gate probabilities must be 2-D (samples, experts)")
    if probs_rows_RE.shape[0] != R or probs_global_GE.shape[0] != G:
        raise ValueError(
            f"distance block {R}x{G} does not match gate rows {probs_rows_RE.shape[0]} "
            f"and global gates {probs_global_GE.shape[0]}"
        )
    E = probs_global_GE.shape[1]
    if probs_rows_RE.shape[1] != E:
        raise ValueError(f"row gates have {probs_rows_RE.shape[1]} experts, global gates {E}")

    dist_RG = dist_RG.to(probs_global_GE.dtype)
    same_sum, all_pairs_sum = _pair_sums(dist_RG, probs_rows_RE, probs_global_GE, symmetric)
    S = same_sum / E
    if E < 2:
        return S, torch.zeros_like(S)
    T = (all_pairs_sum - same_sum) / (E * E - E)
    return S, T


#: Alias under the name the brief first used; :func:`similarity_terms` is the primary name.
sample_similarity_terms = similarity_terms


def combine_similarity_terms(
    S: torch.Tensor, T: torch.Tensor, batch_size: int, beta: float, gamma: float,
    variant: str = "normalized",
) -> torch.Tensor:
    """L_s from the summed terms of :func:`similarity_terms` over the (global) batch.

    ``variant="normalized"`` (default, the paper's intent): ``(beta*S - gamma*T) / B^2``,
    both terms being means over the B^2 ordered pairs.

    ``variant="reference"``: ``beta*S - gamma*T / B^2``, what the published code computes
    because of operator precedence (docs/papers.md A.2.2 step 6, FLAG-BUG). The published
    weights (e.g. beta = 1e-6 on MNIST) were tuned for it; ``beta`` carries an extra factor
    B^2 (about 2.6e5 at B = 512) compared with the normalised variant.

    ``batch_size`` is the global batch size B (the number of columns of D).
    """
    check_choice("loss.ls_variant", variant)  # a ConfigError, which is a ValueError
    pairs = float(batch_size) ** 2
    if variant == "reference":
        return beta * S - gamma * T / pairs
    return (beta * S - gamma * T) / pairs


def sample_similarity_loss(
    x_BD: torch.Tensor | None,
    gate_probs_BE: torch.Tensor,
    beta: float,
    gamma: float,
    variant: str = "normalized",
    squared: bool = False,
    dist_BB: torch.Tensor | None = None,
    distance_method: str = "gram32",
) -> torch.Tensor:
    """Sample-similarity regulariser L_s of Krishnamurthy et al. on one batch (docs/papers.md A.2.2).

    Pulls samples that are close in input space onto the same expert (``beta``, same-expert
    term S) and pushes distant samples onto different experts (``gamma``, different-expert
    term T, subtracted). ``D`` is the exact Euclidean distance between flattened inputs
    (squared if ``squared``), divided by its maximum over the batch; see
    :func:`similarity_terms` for the vectorised sums and :func:`combine_similarity_terms`
    for the two normalisation variants.

    ``dist_BB``, if given, is an already normalised distance matrix of the batch (then
    ``x_BD`` is ignored); it lets a caller compute D once per batch and reuse it. It must be
    symmetric, as every distance matrix is: the gradient uses ``D = D^T``
    (:func:`similarity_terms`, ``symmetric``). ``distance_method`` is passed to
    :func:`sample_distances`.
    """
    check_choice("loss.ls_variant", variant)  # a ConfigError, which is a ValueError
    if dist_BB is None:
        if x_BD is None:
            raise ValueError("sample_similarity_loss needs the inputs x or a distance matrix")
        dist_BB = normalize_distances(
            sample_distances(x_BD, squared=squared, method=distance_method)
        )
    S, T = similarity_terms(dist_BB, gate_probs_BE, gate_probs_BE, symmetric=True)
    return combine_similarity_terms(S, T, gate_probs_BE.shape[0], beta, gamma, variant)
