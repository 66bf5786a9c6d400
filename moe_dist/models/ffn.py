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

    def forward_grouped(self, x_RD: torch.Tensor, counts_E: torch.Tensor,
                        need_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows sorted by expert, ``counts_E[e]`` of them for expert e: ``(out_RD, hidden_RF)``
        (``hidden_RF`` None if not ``need_hidden``: top-k dispatch reads only the outputs).

        No padding to a common length (the padded bmm pays for up to a quarter more rows at
        E = 64). On CUDA, ``F.grouped_mm``: its weight gradient comes out in the parameter's
        layout; it takes no bias gradient, so the biases are added per row. On CPU,
        :class:`_GroupedFFN`: one ``addmm`` per expert and layer into slices of one output,
        about a quarter faster than ``grouped_mm`` there (single thread, hidden 256, FFN 1024).
        """
        if x_RD.device.type == "cpu":
            # in x's dtype, as the bank's bmm path (autocast would cast some products only)
            with torch.autocast("cpu", enabled=False):
                return _GroupedFFN.apply(x_RD, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                         counts_E.tolist(), need_hidden)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        R = x_RD.shape[0]

        def linear(layer: StackedLinear, z_RI: torch.Tensor) -> torch.Tensor:
            w_EIO = layer.weight.to(z_RI.dtype).transpose(1, 2)
            bias_RO = layer.bias.to(z_RI.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
            return F.grouped_mm(z_RI, w_EIO, offs=offs_E) + bias_RO

        hidden_RF = F.relu(linear(self.fc1, x_RD))
        return linear(self.fc2, hidden_RF), hidden_RF


class _GroupedFFN(torch.autograd.Function):
    """The FFN experts on rows sorted by expert (CPU): ``out_RD``, and ``hidden_RF`` if asked.

    Indexing the stacked weights per expert under autograd would give each expert's
    gradient as a full-size ``[E, O, I]`` tensor to be summed; here every gradient is
    written into its slice. Each expert's hidden rows live in a tensor of their own, the
    ReLU's backward masks them in place, and no R x F buffer is made unless the hidden state
    is asked for: at R x F = 8192 x 1024 floats (32 MB, glibc's largest mmap threshold)
    every such buffer is mapped afresh each step and its pages faulted in again.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # records autocast's state (off) for the backward
    def forward(ctx, x_RD, w1_EFD, b1_EF, w2_EDF, b2_ED, splits: list[int], need_hidden: bool):
        w1_EFD, b1_EF, w2_EDF, b2_ED = (t.to(x_RD.dtype) for t in (w1_EFD, b1_EF, w2_EDF, b2_ED))
        out_RD = x_RD.new_empty((x_RD.shape[0], w2_EDF.shape[1]))
        hidden = []
        for e, (x_ND, out_ND) in enumerate(zip(x_RD.split(splits), out_RD.split(splits))):
            hidden.append(torch.addmm(b1_EF[e], x_ND, w1_EFD[e].t()).relu_())
            if x_ND.shape[0]:
                torch.addmm(b2_ED[e], hidden[e], w2_EDF[e].t(), out=out_ND)
        ctx.save_for_backward(x_RD, w1_EFD, w2_EDF, *hidden)
        ctx.splits = splits
        ctx.set_materialize_grads(False)
        return out_RD, torch.cat(hidden) if need_hidden else None

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out_RD, grad_hidden_RF):
        x_RD, w1_EFD, w2_EDF, *hidden = ctx.saved_tensors
        splits = ctx.splits
        if grad_out_RD is None:
            grad_out_RD = x_RD.new_zeros((x_RD.shape[0], w2_EDF.shape[1]))
        grad_out_RD = grad_out_RD.contiguous()
        extra = grad_hidden_RF.split(splits) if grad_hidden_RF is not None else [None] * len(splits)
        grad_x = torch.empty_like(x_RD)
        # empty, not zeros: every expert's slice is written once (zeroed if it got no rows)
        grads = [torch.empty_like(w1_EFD), w1_EFD.new_empty(w1_EFD.shape[:2]),
                 torch.empty_like(w2_EDF), w2_EDF.new_empty(w2_EDF.shape[:2])]
        parts = zip(x_RD.split(splits), grad_out_RD.split(splits), grad_x.split(splits), hidden, extra)
        for e, (x_ND, g_ND, gx_ND, h_NF, gh_extra) in enumerate(parts):
            if not x_ND.shape[0]:
                for grad in grads:
                    grad[e].zero_()
                continue
            torch.mm(g_ND.t(), h_NF, out=grads[2][e])
            torch.sum(g_ND, 0, out=grads[3][e])
            g_NF = g_ND @ w2_EDF[e]
            if gh_extra is not None:
                g_NF += gh_extra
            # ReLU backward in place: the vectorised kernel autograd's ReLU uses; masked_fill_
            # with a bool mask is about 40x slower on CPU (8.9 vs 0.23 ms at 2048 x 1024)
            torch.ops.aten.threshold_backward.grad_input(g_NF, h_NF, 0, grad_input=g_NF)
            torch.mm(g_NF.t(), x_ND, out=grads[0][e])
            torch.sum(g_NF, 0, out=grads[1][e])
            torch.mm(g_NF, w1_EFD[e], out=gx_ND)
        return grad_x, *grads, None, None
