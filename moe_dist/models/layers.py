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
    K  values in one convolution window: C_in * kernel * kernel (+ 1 for the bias)
    P  positions after 2x2 max-pooling (flattened Hp*Wp);  M = N*P
    H, W  spatial size;  S = H*W
    L, D  patch count and patch length of a 1-D input
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.parallel.batchnorm import LocalBatchStats, batch_norm_global


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

    Returns ``[..., K + 1, 4, M]`` where ``[..., :K, a*2 + b, n*P + i*Wp + j]`` is the window
    whose convolution output lands at position ``(2i + a, 2j + b)``: the four pooling phases
    of output ``(i, j)``. Row K is all ones, so that ``[weight | bias] @ cols`` adds the bias
    inside the matrix product and the bias gradient comes out of the same product. Leading
    dims of x beyond ``[N, C, H, W]`` (the expert dim) are kept. Differentiable in x.
    """
    *lead, N, C, H, W = x.shape
    k = kernel_size
    Hp, Wp = (H - k + 1) // 2, (W - k + 1) // 2
    K = C * k * k
    win = x.unfold(-2, k, 1).unfold(-2, k, 1)[..., : 2 * Hp, : 2 * Wp, :, :]  # [.., N, C, 2Hp, 2Wp, k, k]
    win = win.unflatten(-3, (Wp, 2)).unflatten(-5, (Hp, 2))  # [.., N, C, Hp, 2, Wp, 2, k, k]
    d = len(lead)
    order = [*range(d), d + 1, d + 6, d + 7, d + 3, d + 5, d, d + 2, d + 4]  # C k k 2 2 N Hp Wp
    cols = x.new_empty(*lead, K + 1, 4, N * Hp * Wp)
    cols[..., :K, :, :].view(*lead, C, k, k, 2, 2, N, Hp, Wp).copy_(win.permute(order))
    cols[..., K, :, :] = 1
    return cols


class _ConvReluPool(torch.autograd.Function):
    """``max_pool2d(relu(conv2d(x)), 2)`` for stacked experts, from pooling-phase columns.

    Each of the four pooling phases is one matrix product ``[weight | bias] @ cols[:, phase]``;
    a running maximum with a uint8 argmax replaces the ``[N, E, H, W]`` convolution output
    and the int64 indices of max_pool2d. (Profiling the MNIST bank: max_pool2d and its
    backward on that tensor took most of a training step, and oneDNN's weight gradient for a
    one-channel convolution was slower still; it is 60% of the paper-style loop's step.)
    Ties keep the first phase in row-major window order, which is the element max_pool2d
    selects; ReLU after the max equals ReLU before it, gradients included (a window whose
    maximum is <= 0 passes no gradient either way).

    Phase index 4 marks outputs clipped by the ReLU. Backward recomputes nothing: the
    gradient of each phase is the output gradient where that phase won.
    """

    @staticmethod
    def forward(ctx, cols: torch.Tensor, weight_EOK: torch.Tensor):
        # uint8 max/mul instead of torch.where/masked_fill: the latter are several times
        # slower on CPU, and this loop is most of the MNIST bank's step.
        best_EOM = _phase_product(cols, weight_EOK, 0)
        for p in range(1, 4):
            z_EOM = _phase_product(cols, weight_EOK, p)
            won_EOM = (z_EOM > best_EOM).view(torch.uint8)  # strictly: ties keep the earlier phase
            if p == 1:
                phase_EOM = won_EOM
            else:  # phases only grow, so "p where won, else unchanged" is a max
                torch.maximum(phase_EOM, won_EOM.mul_(p), out=phase_EOM)
            torch.maximum(best_EOM, z_EOM, out=best_EOM)
        torch.maximum(phase_EOM, (best_EOM <= 0).view(torch.uint8).mul_(4), out=phase_EOM)
        best_EOM.clamp_(min=0)
        ctx.save_for_backward(cols, weight_EOK, phase_EOM)
        return best_EOM

    @staticmethod
    def backward(ctx, grad_EOM: torch.Tensor):
        cols, weight_EOK, phase_EOM = ctx.saved_tensors
        grad_EOM = grad_EOM.to(weight_EOK.dtype)  # autocast: products ran in low precision
        cols = cols.to(weight_EOK.dtype)
        shared = cols.dim() == 3
        need_cols, need_weight = ctx.needs_input_grad
        grad_cols = torch.zeros_like(cols) if need_cols else None
        grad_weight = torch.zeros_like(weight_EOK) if need_weight else None
        for p in range(4):
            g_EOM = grad_EOM * (phase_EOM == p).to(grad_EOM.dtype)
            cols_KM = cols[..., p, :]
            if need_weight:
                if shared:  # [E*O, M] @ [M, K]
                    grad_weight += (g_EOM.flatten(0, 1) @ cols_KM.t()).view_as(weight_EOK)
                else:
                    grad_weight += torch.bmm(g_EOM, cols_KM.transpose(1, 2))
            if need_cols:
                if shared:  # every expert read the same columns: sum their gradients
                    grad_cols[:, p] = weight_EOK.flatten(0, 1).t() @ g_EOM.flatten(0, 1)
                else:
                    grad_cols[:, :, p] = torch.bmm(weight_EOK.transpose(1, 2), g_EOM)
        return grad_cols, grad_weight


def _phase_product(cols: torch.Tensor, weight_EOK: torch.Tensor, phase: int) -> torch.Tensor:
    """Convolution outputs of one pooling phase, ``[E, O, M]``."""
    if cols.dim() == 3:  # shared columns [K, 4, M]: one GEMM for all experts
        E, O, _ = weight_EOK.shape
        return torch.mm(weight_EOK.flatten(0, 1), cols[:, phase]).view(E, O, -1)
    return torch.bmm(weight_EOK, cols[:, :, phase])


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
        cols = pool_phase_columns(x, self.kernel_size)
        weight_EOK = torch.cat([self.weight.flatten(2), self.bias.unsqueeze(-1)], dim=-1)
        y_EOM = _ConvReluPool.apply(cols, weight_EOK)
        # [E, O, N*P] -> [E, N, O*P]; a view when O == 1 (all the papers' experts)
        return y_EOM.view(E, O, N, -1).transpose(1, 2).reshape(E, N, -1)


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
