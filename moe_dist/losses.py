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
DISTANCE_METHODS = ("gram64", "cdist")

# Pairs recomputed from explicit differences per chunk in the "gram64" method (bounds memory
# at about 8 * chunk * D bytes when a batch holds many identical samples).
_PAIR_CHUNK = 4096


def _gram64_squared_distances(a_RD: torch.Tensor, b_GD: torch.Tensor) -> torch.Tensor:
    """Squared distances in float64 from the Gram matrix, with ill-conditioned pairs redone.

    ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` in float64. Any summation order bounds the rounding
    error of each dot product by ``D * u * |a| |b|`` (u = 2^-53), so the error of a squared
    distance is below ``(2 D + 4) * u * (|a|^2 + |b|^2)``. Pairs whose squared distance is
    not above 2^30 times that bound (near-duplicates, and always the i = j diagonal) are
    recomputed from explicit differences. Every entry therefore has a relative error below
    2^-30, far under float32 resolution (2^-24), and identical samples get exactly 0.
    """
    a64_RD, b64_GD = a_RD.to(torch.float64), b_GD.to(torch.float64)
    na_R = (a64_RD * a64_RD).sum(dim=1)
    nb_G = (b64_GD * b64_GD).sum(dim=1)
    norms_RG = na_R[:, None] + nb_G[None, :]
    sq_RG = (norms_RG - 2.0 * (a64_RD @ b64_GD.t())).clamp_min_(0.0)
    bound_scale = (2 * a64_RD.shape[1] + 4) * 2.0**-53 * 2.0**30
    redo_P2 = (sq_RG <= bound_scale * norms_RG).nonzero()
    for chunk in redo_P2.split(_PAIR_CHUNK):
        rows, cols = chunk[:, 0], chunk[:, 1]
        diff = a64_RD[rows] - b64_GD[cols]
        sq_RG[rows, cols] = (diff * diff).sum(dim=1)
    return sq_RG


def sample_distances(
    x_RD: torch.Tensor, x_GD: torch.Tensor | None = None, squared: bool = False,
    method: str = "gram64",
) -> torch.Tensor:
    """Exact Euclidean distances between flattened samples, ``dist_RG[i, j] = |x_i - x_j|``.

    The reference code uses ``torch.cdist`` without the matrix-multiply expansion
    (docs/papers.md A.2.2 step 2), because the float32 expansion ``|x|^2 + |y|^2 - 2 x.y``
    cancels badly for near-identical images and gives non-zero self-distances.

    ``method="gram64"`` (default) computes the expansion in float64 and recomputes from
    explicit differences every pair where cancellation could cost precision (see
    ``_gram64_squared_distances``): results agree with the exact distance to better than
    float32 resolution, self-distances are exactly 0, and on CPU it is about 9x faster than
    the difference kernel at B = 512, D = 784, which otherwise dominates the cost of L_s.
    Float64 inputs use ``torch.cdist`` (difference kernel) in float64.
    ``method="cdist"`` is the reference code's ``torch.cdist(...,
    compute_mode="donot_use_mm_for_euclid_dist")`` in the input dtype.

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
    b_GD = a_RD if x_GD is None else x_GD.detach().reshape(x_GD.shape[0], -1)
    if a_RD.shape[1] != b_GD.shape[1]:
        raise ValueError(
            f"samples have {a_RD.shape[1]} and {b_GD.shape[1]} features; they must match"
        )
    if method == "gram64" and a_RD.dtype != torch.float64:
        sq_RG = _gram64_squared_distances(a_RD, b_GD)
        return (sq_RG if squared else sq_RG.sqrt()).to(a_RD.dtype)
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


def similarity_terms(
    dist_RG: torch.Tensor, probs_rows_RE: torch.Tensor, probs_global_GE: torch.Tensor
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
    dp_RE = dist_RG @ probs_global_GE  # sum_j D_ij p_e(j)
    same_sum = (probs_rows_RE * dp_RE).sum()
    S = same_sum / E
    if E < 2:
        return S, torch.zeros_like(S)
    # r_R^T D r_G = sum_i r_i * sum_j D_ij r_j, and D r_G is the row sum of D P_G.
    all_pairs_sum = (probs_rows_RE.sum(dim=1) * dp_RE.sum(dim=1)).sum()
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
    distance_method: str = "gram64",
) -> torch.Tensor:
    """Sample-similarity regulariser L_s of Krishnamurthy et al. on one batch (docs/papers.md A.2.2).

    Pulls samples that are close in input space onto the same expert (``beta``, same-expert
    term S) and pushes distant samples onto different experts (``gamma``, different-expert
    term T, subtracted). ``D`` is the exact Euclidean distance between flattened inputs
    (squared if ``squared``), divided by its maximum over the batch; see
    :func:`similarity_terms` for the vectorised sums and :func:`combine_similarity_terms`
    for the two normalisation variants.

    ``dist_BB``, if given, is an already normalised distance matrix (then ``x_BD`` is
    ignored); it lets a caller compute D once per batch and reuse it. ``distance_method``
    is passed to :func:`sample_distances`.
    """
    check_choice("loss.ls_variant", variant)  # a ConfigError, which is a ValueError
    if dist_BB is None:
        if x_BD is None:
            raise ValueError("sample_similarity_loss needs the inputs x or a distance matrix")
        dist_BB = normalize_distances(
            sample_distances(x_BD, squared=squared, method=distance_method)
        )
    S, T = similarity_terms(dist_BB, gate_probs_BE, gate_probs_BE)
    return combine_similarity_terms(S, T, gate_probs_BE.shape[0], beta, gamma, variant)
