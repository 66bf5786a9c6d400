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

        ``F.grouped_mm`` multiplies each expert's rows by its weights without padding them to
        a common length (the padded bmm pays for up to a quarter more rows at E = 64), and
        its weight gradient comes out in the parameter's layout. It takes no bias gradient,
        so the biases are added per row.
        """
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        R = x_RD.shape[0]

        def linear(layer: StackedLinear, z_RI: torch.Tensor) -> torch.Tensor:
            w_EIO = layer.weight.to(z_RI.dtype).transpose(1, 2)
            bias_RO = layer.bias.to(z_RI.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
            return F.grouped_mm(z_RI, w_EIO, offs=offs_E) + bias_RO

        hidden_RF = F.relu(linear(self.fc1, x_RD))
        return linear(self.fc2, hidden_RF), hidden_RF
