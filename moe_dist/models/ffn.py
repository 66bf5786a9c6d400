"""Token-level feed-forward experts, the shape of transformer MoE layers.

Not one of the papers' experts: they exist to check our top-k dispatch against DeepSpeed's
token-level MoE (``deepspeed.moe.layer.MoE`` needs expert output size = input size) and to
benchmark it (``benchmarks/bench_dispatch.py``). Same conventions as ``experts.py``: the
plain module and its stacked bank with the expert dim first.

Shape legend: E experts; N rows per expert batch; D model (hidden) size; F FFN size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.models.experts import ExpertBank
from moe_dist.models.layers import StackedLinear


class FFNExpert(nn.Module):
    """Linear D->F, ReLU, Linear F->D. ``forward(x) -> (out_ND, hidden_NF)``."""

    def __init__(self, hidden_size: int = 256, ffn_size: int = 1024):
        super().__init__()
        self.init_kwargs = {"hidden_size": hidden_size, "ffn_size": ffn_size}
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.fc2 = nn.Linear(ffn_size, hidden_size)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_NF = F.relu(self.fc1(x_ND))
        return self.fc2(hidden_NF), hidden_NF


class FFNExpertBank(ExpertBank):
    """Stacked :class:`FFNExpert`: two ``baddbmm`` calls on ``[E, N, D]``, or, for rows
    grouped by expert (:meth:`forward_grouped`), two grouped matrix products with no padding.
    """

    expert_class = FFNExpert
    grouped_rows = hasattr(F, "grouped_mm")
    """Whether top-k dispatch may call :meth:`forward_grouped` (see :meth:`supports_grouped`)."""

    def supports_grouped(self, x: torch.Tensor) -> bool:
        """``F.grouped_mm`` runs float32 on CPU; on CUDA its kernels want bfloat16 (SM >= 80)."""
        return self.grouped_rows and (x.device.type == "cpu" or x.dtype == torch.bfloat16)

    def _build(self, num_experts: int, hidden_size: int, ffn_size: int) -> None:
        self.fc1 = StackedLinear(num_experts, hidden_size, ffn_size)
        self.fc2 = StackedLinear(num_experts, ffn_size, hidden_size)

    def forward(self, x: torch.Tensor, shared: bool,
                mask_EN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_END = x.unsqueeze(0).expand(self.num_experts, *x.shape) if shared else x
        hidden_ENF = F.relu(self.fc1(x_END))
        return self.fc2(hidden_ENF), hidden_ENF

    def forward_grouped(self, x_RD: torch.Tensor,
                        counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows sorted by expert, ``counts_E[e]`` of them for expert e: ``(out_RD, hidden_RF)``.

        No padding to a common length (the padded bmm pays for up to a quarter more rows at
        E = 64). On CUDA, ``F.grouped_mm``: its weight gradient comes out in the parameter's
        layout; it takes no bias gradient, so the biases are added per row. On CPU,
        :class:`_GroupedLinear`: one ``addmm`` per expert into slices of one output, about a
        quarter faster than ``grouped_mm`` there (single thread, hidden 256, FFN 1024).
        """
        if x_RD.device.type == "cpu":
            splits = counts_E.tolist()
            # in place: the pre-activation is not needed for the backward (saves an R x F buffer)
            hidden_RF = _GroupedLinear.apply(x_RD, self.fc1.weight, self.fc1.bias, splits).relu_()
            return _GroupedLinear.apply(hidden_RF, self.fc2.weight, self.fc2.bias, splits), hidden_RF
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        R = x_RD.shape[0]

        def linear(layer: StackedLinear, z_RI: torch.Tensor) -> torch.Tensor:
            w_EIO = layer.weight.to(z_RI.dtype).transpose(1, 2)
            bias_RO = layer.bias.to(z_RI.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
            return F.grouped_mm(z_RI, w_EIO, offs=offs_E) + bias_RO

        hidden_RF = F.relu(linear(self.fc1, x_RD))
        return linear(self.fc2, hidden_RF), hidden_RF


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w_e^T + b_e`` for rows sorted by expert (CPU).

    Indexing the stacked weight per expert under autograd would give each expert's gradient
    as a full-size ``[E, O, I]`` tensor to be summed: the hand-written backward writes every
    gradient into its slice instead.
    """

    @staticmethod
    def forward(ctx, x_RI: torch.Tensor, w_EOI: torch.Tensor, b_EO: torch.Tensor, splits: list[int]):
        w_EOI, b_EO = w_EOI.to(x_RI.dtype), b_EO.to(x_RI.dtype)
        out_RO = x_RI.new_empty((x_RI.shape[0], w_EOI.shape[1]))
        for e, (x_NI, out_NO) in enumerate(zip(x_RI.split(splits), out_RO.split(splits))):
            if x_NI.shape[0]:
                torch.addmm(b_EO[e], x_NI, w_EOI[e].t(), out=out_NO)
        ctx.save_for_backward(x_RI, w_EOI)
        ctx.splits = splits
        return out_RO

    @staticmethod
    def backward(ctx, grad_RO: torch.Tensor):
        x_RI, w_EOI = ctx.saved_tensors
        grad_RO = grad_RO.contiguous()
        grad_x = torch.empty_like(x_RI)
        # empty, not zeros: every expert's slice is written once (zeroed if it got no rows),
        # which saves a pass over E * O * I elements per step (32 MB at E = 64 here)
        grad_w = torch.empty_like(w_EOI)
        grad_b = w_EOI.new_empty(w_EOI.shape[:2])
        parts = zip(x_RI.split(ctx.splits), grad_RO.split(ctx.splits), grad_x.split(ctx.splits))
        for e, (x_NI, g_NO, gx_NI) in enumerate(parts):
            if x_NI.shape[0]:
                torch.mm(g_NO, w_EOI[e], out=gx_NI)
                torch.mm(g_NO.t(), x_NI, out=grad_w[e])
                torch.sum(g_NO, 0, out=grad_b[e])
            else:
                grad_w[e].zero_()
                grad_b[e].zero_()
        return grad_x, grad_w, grad_b, None
