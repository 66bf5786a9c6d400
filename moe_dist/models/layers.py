"""Stacked layers: E experts' copies of one layer, run as a single batched computation.

Design choice 1 (docs/design.md): the experts of one MoE share an architecture, so each layer
holds the E experts' parameters stacked along a leading expert dimension and runs them
together, with no Python loop over experts. Every parameter and buffer here has shape
``[E] + (shape of the same tensor in the single-expert nn.Module)`` and the same name, so
an expert bank's state dict is the single expert's state dict with the experts stacked on
dim 0, and a checkpoint can be split by global expert id.

Activation layouts (what flows between these layers):

* image layers: ``[N, E*C, H, W]``; expert e owns channels ``e*C .. e*C + C - 1``, so a
  stacked convolution is a grouped convolution (``groups=E``) and a stacked BatchNorm is a
  BatchNorm over ``E*C`` channels. A first convolution whose input every expert shares
  (dense routing) is one convolution with ``E*C_out`` output channels, with no copies of
  the input.
* vector layers: ``[E, N, F]``; a stacked linear layer is one ``baddbmm``.

Shape legend (suffixes on tensor names):

    E  experts in the bank
    N  rows per expert batch (the shared batch, or each expert's padded batch)
    C  channels of one expert;  X = E*C stacked channels
    I, O  input and output features (or channels) of one expert's layer
    K  values in one convolution window: C_in * kernel * kernel
    P  positions after 2x2 max-pooling (flattened Hp*Wp);  M = P*N (sample index innermost)
    Q  convolution outputs per channel: 4 pooling phases x M
    H, W  spatial size;  S = H*W
    L, D  patch count and patch length of a 1-D input
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.parallel.batchnorm import LocalBatchStats, batch_norm_global
from moe_dist.models import native


class StackedLinear(nn.Module):
    """E copies of ``nn.Linear(in_features, out_features)``: ``[E, N, I] -> [E, N, O]``.

    ``weight`` keeps nn.Linear's ``[O, I]`` layout per expert; ``baddbmm`` reads its
    transpose through strides (no copy) and adds the bias in the same call.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))

    def forward(self, x_ENI: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x_ENI, self.weight.transpose(1, 2))


class StackedConv2d(nn.Module):
    """E copies of ``nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)``.

    ``shared=True``: x is ``[N, I, H, W]``, seen by every expert: one convolution with
    ``E*O`` output channels. ``shared=False``: x is ``[N, E*I, H, W]``, expert e reading its
    own I channels: a grouped convolution. Output ``[N, E*O, H', W']`` in both cases.
    """

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: int,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.padding = padding
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        bias_X = None if self.bias is None else self.bias.flatten()
        return F.conv2d(x, self.weight.flatten(0, 1), bias_X, padding=self.padding,
                        groups=1 if shared else self.num_experts)


class StackedBatchNorm2d(nn.Module):
    """E copies of ``nn.BatchNorm2d(num_features)`` on ``[N, E*C, H, W]`` activations.

    Without a mask this is ``F.batch_norm`` over the E*C channels, which is exactly E
    independent BatchNorms. With ``mask_EN`` (expert e's row n is real where it is 1, padding
    where 0; top-k dispatch pads every expert's batch to the same length) the training-mode
    statistics of expert e use only its real rows, and its running statistics are updated as
    nn.BatchNorm2d would update them on those rows alone (unbiased running variance);
    an expert with no real rows leaves its running statistics and counter unchanged.
    Padding rows come out finite but meaningless; the caller discards them. Under several
    processes the statistics are those of the global batch (``moe_dist.parallel.batchnorm``).

    ``num_batches_tracked`` is per expert (shape ``[E]``), like every other buffer of a bank,
    so that a checkpoint splits cleanly by expert.
    """

    def __init__(self, num_experts: int, num_features: int, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.empty(num_experts, num_features))
        self.bias = nn.Parameter(torch.empty(num_experts, num_features))
        self.register_buffer("running_mean", torch.zeros(num_experts, num_features))
        self.register_buffer("running_var", torch.ones(num_experts, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_experts, dtype=torch.long))
        # Whose rows the training statistics cover: this process's (the default), or the
        # global batch's once moe_dist.parallel.parallelize installed its reducer.
        self.batch_stats = LocalBatchStats()

    def forward(self, x_NXHW: torch.Tensor, mask_EN: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or (mask_EN is None and not self.batch_stats.distributed):
            if self.training:
                self.num_batches_tracked.add_(1)
            # Flattened views of the [E, C] buffers: F.batch_norm updates them in place.
            return F.batch_norm(x_NXHW, self.running_mean.view(-1), self.running_var.view(-1),
                                self.weight.flatten(), self.bias.flatten(), self.training,
                                self.momentum, self.eps)
        # Padded rows (mask) or the global batch's statistics (several processes).
        y, seen_E = batch_norm_global(x_NXHW, self.weight.shape[0], None if mask_EN is None else mask_EN.t(),
                                      self.batch_stats, self.weight, self.bias, self.running_mean,
                                      self.running_var, self.momentum, self.eps)
        self.num_batches_tracked.add_(seen_E.long())
        return y


def pool_phase_columns(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """im2col for a valid k x k convolution followed by a 2x2/2 max-pool.

    Returns ``[..., K, 4, M]``, ``K = C*k*k``, ``M = P*N``, where
    ``[..., :, a*2 + b, (i*Wp + j)*N + n]`` is the window of sample n whose convolution
    output lands at position ``(2i + a, 2j + b)``: the four pooling phases of output
    ``(i, j)``. Leading dims of x beyond ``[N, C, H, W]`` (the expert dim) are kept.
    Differentiable in x. The sample index is innermost, so the copy moves runs of N
    contiguous floats (6x faster on CPU than runs of Wp, sample-outermost columns); it is one
    reshape with no in-place write, so it also runs under ``torch.func.vmap`` (stacked runs
    call the gates that way).
    """
    *lead, N, C, H, W = x.shape
    k = kernel_size
    Hp, Wp = (H - k + 1) // 2, (W - k + 1) // 2
    d = len(lead)
    x_CHWN = x.movedim(d, -1).contiguous()  # [.., C, H, W, N]
    win = x_CHWN.unfold(d + 1, k, 1).unfold(d + 2, k, 1)  # [.., C, H', W', N, k, k]
    win = win.narrow(d + 1, 0, 2 * Hp).narrow(d + 2, 0, 2 * Wp)
    win = win.unflatten(d + 2, (Wp, 2)).unflatten(d + 1, (Hp, 2))  # [.., C, Hp, 2, Wp, 2, N, k, k]
    order = [*range(d), d, d + 6, d + 7, d + 2, d + 4, d + 1, d + 3, d + 5]  # C k k 2 2 Hp Wp N
    return win.permute(order).reshape(*lead, C * k * k, 4, Hp * Wp * N)


class _RecentColumns:
    """The columns of recent inputs, while each input is alive and unmodified: under dense
    routing the FashionMNIST gate and the experts read the same images with the same kernel,
    so the experts reuse the gate's columns instead of building them again (a stack of runs
    asks for its members' inputs in turn, hence several entries). An entry goes when its
    input is freed, so nothing is held between steps. Only plain tensors that need no
    gradient are remembered (a functorch wrapper, e.g. under vmap, or an input with a graph
    is rebuilt each time)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.entries: dict[int, tuple[tuple, weakref.ref, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        if x.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(x):
            return pool_phase_columns(x, kernel_size)
        key = (kernel_size, x._version, x.shape, x.stride(), x.dtype, x.device)
        entry = self.entries.get(id(x))
        if entry is not None and entry[1]() is x and entry[0] == key:
            return entry[2]
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        cols = pool_phase_columns(x, kernel_size)
        ident = id(x)
        self.entries[ident] = (key, weakref.ref(x, lambda _: self.entries.pop(ident, None)), cols)
        return cols


shared_pool_phase_columns = _RecentColumns()


def first_max_phase(z: torch.Tensor, best: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 index of the first of the 4 pooling phases (dim ``dim`` of ``z``) whose value is
    ``best`` (their maximum): max_pool2d's choice among tied elements, the phases being in
    row-major window order. One comparison, a product and a max (torch.max with indices is
    several times slower on CPU); no in-place write, so it runs under ``torch.func.vmap``.
    A window whose maximum is NaN matches no phase and gets phase 3: the index stays in range,
    so a run that diverged still runs backward (to NaN gradients) instead of raising, which
    would end a stack of runs that only had to drop that member."""
    shape = [1] * z.dim()
    shape[dim] = 4
    code = torch.arange(4, 0, -1, dtype=torch.uint8, device=z.device).view(shape)  # 4 - phase
    return (4 - ((z == best.unsqueeze(dim)) * code).amax(dim)).clamp(max=3)


def long_rows_matmul_t(a_XQ: torch.Tensor, b_KQ: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for a few long rows (X, K ~ 10, Q ~ 350,000: a convolution's weight
    gradient from its columns). MKL runs that product on one thread; the two halves of Q
    as one batched product run on two, then add."""
    X, Q = a_XQ.shape
    if Q % 2 or Q < 2 ** 16:
        return a_XQ @ b_KQ.t()
    halves_2XH = a_XQ.view(X, 2, Q // 2).transpose(0, 1)
    return torch.bmm(halves_2XH, b_KQ.view(b_KQ.shape[0], 2, Q // 2).permute(1, 2, 0)).sum(0)


def relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` where the ReLU's output ``out`` is positive, else 0: ReLU's own backward kernel
    (16x faster on CPU than ``torch.where`` with a uint8 or bool condition)."""
    return torch.ops.aten.threshold_backward(grad, out, 0)


class _ConvReluPool(torch.autograd.Function):
    """``max_pool2d(relu(conv2d(x)), 2)`` for stacked experts, from pooling-phase columns.

    One matrix product gives the convolution outputs of the four pooling phases; their
    maximum and a uint8 index of the winning phase replace the ``[N, E, H, W]`` convolution
    output and the int64 indices of max_pool2d. (Profiling the MNIST bank: max_pool2d and
    its backward on that tensor took most of a training step, and oneDNN's weight gradient
    for a one-channel convolution was slower still; it is 60% of the paper-style loop's step.)
    Ties keep the first phase in row-major window order, which is the element max_pool2d
    selects; ReLU after the max equals ReLU before it, gradients included (a window whose
    maximum is <= 0 passes no gradient either way). The bias, the same for the four phases,
    is added after the max (so the columns carry no ones row and are the gate's).

    Backward recomputes nothing: the output gradient, where the ReLU passed it, goes to the
    winning phase, and one matrix product gives the weight gradient.
    """

    @staticmethod
    def forward(ctx, cols: torch.Tensor, weight_EOK: torch.Tensor, bias_EO: torch.Tensor):
        E, O, K = weight_EOK.shape
        M = cols.shape[-1]
        if cols.dim() == 3:  # shared columns [K, 4, M]: one GEMM for all experts
            z_EO4M = torch.mm(weight_EOK.reshape(E * O, K), cols.view(K, 4 * M)).view(E, O, 4, M)
        else:
            z_EO4M = torch.bmm(weight_EOK, cols.view(E, K, 4 * M)).view(E, O, 4, M)
        best_EOM = z_EO4M.amax(2)
        phase_EOM = first_max_phase(z_EO4M, best_EOM, 2)
        out_EOM = best_EOM.add_(bias_EO.unsqueeze(-1).to(best_EOM.dtype)).clamp_(min=0)
        ctx.save_for_backward(cols, weight_EOK, phase_EOM, out_EOM)
        return out_EOM

    @staticmethod
    def backward(ctx, grad_EOM: torch.Tensor):
        cols, weight_EOK, phase_EOM, out_EOM = ctx.saved_tensors
        E, O, K = weight_EOK.shape
        M = cols.shape[-1]
        grad_EOM = grad_EOM.to(weight_EOK.dtype)  # autocast: products ran in low precision
        cols = cols.to(weight_EOK.dtype)
        g_EOM = relu_backward(grad_EOM, out_EOM.to(grad_EOM.dtype))
        index_EO1M = phase_EOM.long().unsqueeze(2)
        dz_EOQ = g_EOM.new_zeros(E, O, 4, M).scatter_(2, index_EO1M, g_EOM.unsqueeze(2)).view(E, O, 4 * M)
        need_cols, need_weight, need_bias = ctx.needs_input_grad
        grad_cols = grad_weight = None
        if cols.dim() == 3:  # [E*O, 4M] @ [4M, K]; every expert read the same columns
            if need_weight:
                grad_weight = long_rows_matmul_t(dz_EOQ.view(E * O, -1), cols.view(K, -1)).view(E, O, K)
            if need_cols:
                grad_cols = (weight_EOK.reshape(E * O, K).t() @ dz_EOQ.view(E * O, -1)).view_as(cols)
        else:
            if need_weight:
                grad_weight = torch.bmm(dz_EOQ, cols.view(E, K, -1).transpose(1, 2))
            if need_cols:
                grad_cols = torch.bmm(weight_EOK.transpose(1, 2), dz_EOQ).view_as(cols)
        return grad_cols, grad_weight, g_EOM.sum(-1) if need_bias else None


class StackedConvReluPool(nn.Module):
    """E copies of ``nn.Conv2d(in_channels, out_channels, k)`` + ReLU + 2x2 max-pool, fused.

    The first block of the MNIST-family experts (docs/papers.md A.1.1-A.1.3). Parameters have
    nn.Conv2d's names and shapes with the expert dim in front. ``shared=True``: x is
    ``[N, C, H, W]``; ``shared=False``: x is ``[E, N, C, H, W]``. Output ``[E, N, O*P]``: each
    expert's pooled maps flattened in nn.Module order (channel, row, column), ready for a
    StackedLinear.
    """

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels))

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        E, O = self.bias.shape
        N = x.shape[0] if shared else x.shape[1]
        cols = shared_pool_phase_columns(x, self.kernel_size) if shared else pool_phase_columns(x, self.kernel_size)
        weight_EOK = self.weight.flatten(2)
        block = native.ExpertsBlock if native.runs(cols, weight_EOK, self.bias) else _ConvReluPool
        y_EOM = block.apply(cols, weight_EOK, self.bias)
        return y_EOM.view(E, O, -1, N).permute(0, 3, 1, 2).reshape(E, N, -1)  # [E, O, P*N] -> [E, N, O*P]


class StackedPatchConv1d(nn.Module):
    """E copies of ``nn.Conv1d(1, out_channels, patch_size, stride=patch_size)`` (docs/papers.md B.2).

    A convolution whose stride equals its kernel is a linear map applied to each patch, so
    it runs as one matrix product over all patches and experts. Returns the pre-activation
    responses ``[E, N, L, O]`` (a strided view in the shared case).
    """

    def __init__(self, num_experts: int, out_channels: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, 1, patch_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels))

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        E, O = self.bias.shape
        w_EOD = self.weight.squeeze(2)
        if shared:  # x [N, ...]: [N, L, D] @ [D, E*O]
            x_NLD = x.reshape(x.shape[0], -1, self.patch_size)
            z_NLX = torch.addmm(self.bias.flatten(), x_NLD.flatten(0, 1), w_EOD.flatten(0, 1).t())
            return z_NLX.view(*x_NLD.shape[:2], E, O).permute(2, 0, 1, 3)
        N = x.shape[1]  # x [E, N, ...]
        x_EJD = x.reshape(E, -1, self.patch_size)  # J = N*L patches per expert
        z_EJO = torch.baddbmm(self.bias.unsqueeze(1), x_EJD, w_EOD.transpose(1, 2))
        return z_EJO.view(E, N, -1, O)


# ----------------------------------------------------------------- the FashionMNIST gate's block


def sum_of_squares(x_CQ: torch.Tensor, piece: int = 128) -> torch.Tensor:
    """``(x * x).sum(1)`` with no ``[C, Q]`` temporary, accurate for long rows: norms of
    pieces of at most ``piece`` values, squared and added in float64 (float32 where the
    device has no float64). (A float32 norm of a whole row is far off when values repeat, as
    Fashion-MNIST's flat background makes them: 2e-6 relative on a gate convolution's 346,112
    outputs; pieces of 4,096, 2e-6; of 128, 6e-8, as the two-pass sum of the squares.)"""
    Q = x_CQ.shape[1]
    L = max(min(piece, Q), 1)
    wide = torch.float32 if x_CQ.device.type == "mps" else torch.float64
    head = torch.linalg.vector_norm(x_CQ.unfold(1, L, L), dim=2).to(wide).square().sum(1)
    tail = torch.linalg.vector_norm(x_CQ[:, Q - Q % L:], dim=1).to(wide).square()
    return (head + tail).to(x_CQ.dtype)


def _scale_rows(x_CQ: torch.Tensor, factor_C: torch.Tensor) -> torch.Tensor:
    """``x * factor[:, None]``, in place on plain tensors (x is a fresh product: an in-place
    pass reads memory that is still in cache). Under torch.func transforms it is out of
    place: vmap may batch the factor (gamma) but not x, and then cannot write into x."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if wrapped(x_CQ) or wrapped(factor_C):
        return x_CQ * factor_C.unsqueeze(1)
    return x_CQ.mul_(factor_C.unsqueeze(1))


class _ConvBatchNormReluPool(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(conv2d(x))), 2)`` in training mode, from pooling-phase
    columns (one matrix product for the four phases, ``[C, 4, M]``).

    This block touches the largest activation of a FashionMNIST step (``[C, Q]``, Q = 4M
    positions per channel, 11 MB at batch 512), and on CPU each pass over it runs at memory
    bandwidth, so the design counts passes: the product is centred in place (two-pass
    statistics, as nn.BatchNorm2d on CPU, the second pass by :func:`sum_of_squares`), then
    scaled in place by ``sign(gamma) / std`` (sign 1 at gamma = 0) into
    ``u = sign(gamma) xhat``, which is largest where ``y = gamma xhat + beta`` is; ``y`` is
    only formed on the pooled maxima. The winning phase is the first in row-major window order
    on ties (max_pool2d's choice), phase 0 where gamma = 0 (y is flat there); a window clipped
    by the ReLU passes no gradient. Backward is BatchNorm's closed-form gradient scattered to
    the winning phases, then one matrix product for the weight gradient. The conv bias only
    shifts the mean, which BatchNorm removes: it enters the running mean and gets a zero
    gradient. Returns the pooled ``[C, M]`` output, the batch mean and biased variance (for
    the running statistics) and, as non-differentiable outputs so that ``torch.func``
    transforms see them, what backward reads.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(cols_K4M, weight_CK, bias_C, gamma_C, beta_C, eps):
        K, _, M = cols_K4M.shape
        Q = 4 * M
        z_CQ = weight_CK @ cols_K4M.reshape(K, Q)
        # two-pass statistics, as nn.BatchNorm2d on CPU; then z becomes u in place (z is ours)
        mean_C = z_CQ.mean(1)
        centred_CQ = z_CQ.sub_(mean_C.unsqueeze(1))
        var_C = sum_of_squares(centred_CQ) / Q
        invstd_C = torch.rsqrt(var_C + eps)
        sign_C = torch.where(gamma_C < 0, -1.0, 1.0).to(gamma_C.dtype)
        u_C4M = _scale_rows(centred_CQ, sign_C * invstd_C).view(-1, 4, M)
        best_CM = u_C4M.amax(1)
        # where gamma = 0 every phase gives y = beta: max_pool2d keeps the first
        phase_CM = first_max_phase(u_C4M, best_CM, 1) * (gamma_C != 0).to(torch.uint8).unsqueeze(1)
        out_CM = (best_CM * gamma_C.abs().unsqueeze(1) + beta_C.unsqueeze(1)).clamp(min=0)
        return out_CM, mean_C + bias_C, var_C, u_C4M, invstd_C, phase_CM

    @staticmethod
    def setup_context(ctx, inputs, output):
        cols_K4M, weight_CK, _, gamma_C, _, _ = inputs
        out_CM, mean_C, var_C, u_C4M, invstd_C, phase_CM = output
        ctx.mark_non_differentiable(mean_C, var_C, u_C4M, invstd_C, phase_CM)
        # backward reads only the output's gradient: no zero-filled [C, Q] for the others
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cols_K4M, weight_CK, gamma_C, u_C4M, invstd_C, phase_CM, out_CM)

    @staticmethod
    def backward(ctx, grad_CM, *_):
        if grad_CM is None:  # the pooled output was not used
            return None, None, None, None, None, None
        cols_K4M, weight_CK, gamma_C, u_C4M, invstd_C, phase_CM, out_CM = ctx.saved_tensors
        K, _, M = cols_K4M.shape
        C, Q = u_C4M.shape[0], 4 * M
        g_CM = relu_backward(grad_CM, out_CM)
        index_C1M = phase_CM.long().unsqueeze(1)
        sign_C = torch.where(gamma_C < 0, -1.0, 1.0).to(gamma_C.dtype)
        xhat_CM = u_C4M.gather(1, index_C1M).squeeze(1) * sign_C.unsqueeze(1)
        grad_beta_C = g_CM.sum(1)
        grad_gamma_C = (g_CM * xhat_CM).sum(1)
        # dz = scale (dy - mean(dy) - xhat mean(dy xhat)), means over the Q positions, dy being
        # g at each window's winning phase and 0 elsewhere; xhat = sign u
        scale_C = gamma_C * invstd_C
        shift_C1 = (scale_C * grad_beta_C / Q).unsqueeze(1)
        slope_C1 = (sign_C * scale_C * grad_gamma_C / Q).unsqueeze(1)
        dz_CQ = (u_C4M.view(C, Q) * -slope_C1).sub_(shift_C1)
        dz_CQ.view(C, 4, M).scatter_add_(1, index_C1M, (g_CM * scale_C.unsqueeze(1)).unsqueeze(1))
        need_cols, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_cols = (weight_CK.t() @ dz_CQ).view(K, 4, M) if need_cols else None
        grad_weight = long_rows_matmul_t(dz_CQ, cols_K4M.reshape(K, Q)) if need_weight else None
        grad_bias = torch.zeros_like(gamma_C) if need_bias else None
        return grad_cols, grad_weight, grad_bias, grad_gamma_C, grad_beta_C, None


def conv_batchnorm_relu_pool(x_NCHW: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``max_pool2d(relu(bn(conv(x))), 2).flatten(1)`` for a training-mode BatchNorm (see
    :func:`fuses_conv_batchnorm`), fused: natively (:class:`moe_dist.models.native.GateBlock`,
    on this process's statistics or, under several processes, the global batch's) or
    :class:`_ConvBatchNormReluPool` (this process's statistics): the same values and
    gradients, and the running statistics and counter updated exactly as nn.BatchNorm2d (or
    moe_dist's global BatchNorm2d) updates them (momentum, or the cumulative average when it
    is None; unbiased running variance)."""
    N, _, H, W = x_NCHW.shape
    C, _, k, _ = conv.weight.shape
    P = ((H - k + 1) // 2) * ((W - k + 1) // 2)
    cols_K4M = shared_pool_phase_columns(x_NCHW, k)
    bias_C = conv.bias if conv.bias is not None else conv.weight.new_zeros(C)
    weight_CK = conv.weight.flatten(1)
    stats = getattr(bn, "batch_stats", None) or LocalBatchStats()
    if native.runs(cols_K4M, weight_CK, bias_C, bn.weight, bn.bias, allow_empty=stats.distributed):
        out_CM, mean_C, var_C, count = native.GateBlock.apply(cols_K4M, weight_CK, bias_C, bn.weight, bn.bias,
                                                              bn.eps, stats)
        count = float(count)
    elif stats.distributed:  # the PyTorch fused block knows only this process's statistics
        raise RuntimeError("global BatchNorm reached the fused gate block without the native kernels: "
                           "fuses_conv_batchnorm should have sent it to the nn modules")
    else:
        out_CM, mean_C, var_C, *_ = _ConvBatchNormReluPool.apply(cols_K4M, weight_CK, bias_C, bn.weight, bn.bias,
                                                                  bn.eps)
        count = float(cols_K4M.shape[1] * cols_K4M.shape[2])
    _update_running_stats(bn, mean_C, var_C, count)
    return out_CM.view(C, P, N).permute(2, 0, 1).reshape(N, C * P)  # [C, P, N] -> [N, C*P]


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean_C: torch.Tensor, var_C: torch.Tensor, count: float) -> None:
    bn.num_batches_tracked.add_(1)
    if count == 0:  # no sample in the whole batch: nothing to average in
        return
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.copy_(momentum * mean_C + (1 - momentum) * bn.running_mean)
    bn.running_var.copy_(momentum * var_C * (count / max(count - 1, 1)) + (1 - momentum) * bn.running_var)


def fuses_conv_batchnorm(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Whether :func:`conv_batchnorm_relu_pool` computes ``conv -> bn -> ReLU -> 2x2 pool`` on
    ``x``: BatchNorm in training mode, affine, with running statistics; a plain valid
    convolution whose output the pool covers (even size), so the statistics over the four
    pooling phases are those over the whole output. On this process's statistics that is
    any non-empty batch; on the global batch's (several processes,
    ``moe_dist.parallel.batchnorm``) only the native block can, and the answer must be the
    same on every rank, so it depends on nothing a rank's share of the batch changes (its
    size included: a rank without samples still takes part in the statistics)."""
    stats = getattr(bn, "batch_stats", None)
    distributed = bool(stats and stats.distributed)
    if not (bn.training and bn.affine and bn.track_running_stats):
        return False
    if torch.is_autocast_enabled(x.device.type):  # the matrix product would run in low precision
        return False
    if conv.stride != (1, 1) or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
        return False
    k = conv.kernel_size[0]
    fits = (x.dim() == 4 and conv.kernel_size == (k, k) and (x.shape[2] - k + 1) % 2 == 0
            and (x.shape[3] - k + 1) % 2 == 0 and x.dtype == conv.weight.dtype)
    if not distributed:
        return fits and x.shape[0] > 0
    per_row = [t for t in (conv.bias, bn.weight, bn.bias) if t is not None]
    same_everywhere = (fits and x.shape[1] * k * k == conv.weight[0].numel() and not x.requires_grad
                       and native.applies(x.new_zeros(conv.weight[0].numel(), 4, 1), conv.weight.flatten(1), *per_row))
    # whether the kernels built is each rank's own finding: agreed once, on every rank
    return same_everywhere and stats.all_agree("native_gate_block", native.library() is not None)
