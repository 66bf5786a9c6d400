"""Gating networks: the papers' softmax gates, attentive gates, Chen's router, the attention.

Each image architecture has one gate class with an ``attentive`` switch (docs/papers.md A.1):

* ``attentive=False``, the original gate: ``forward(x) -> logits [B, E]``; the MoE applies
  softmax(z / T).
* ``attentive=True``: ``forward(x) -> g(x) [B, H]``, the query source of
  :class:`ExpertAttention`; there is no output layer.

Both variants use the same submodule names (``conv``/``conv1..4``, ``bn``/``bn2``/``bn4``,
``fc1``, ``fc2``, ``out``), so distillation (docs/papers.md A.8) is
``original_gate.load_state_dict(attentive_gate.state_dict(), strict=False)``: the trunk is
copied and the original gate keeps its freshly initialised ``out`` layer.

Shape legend: B batch; E experts; H hidden size of the attention (32 for MNIST/FMNIST,
256 for CIFAR-100); F flattened features; L, D patch count and length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.models.layers import conv_batchnorm_relu_pool, fuses_conv_batchnorm
from moe_dist.parallel.batchnorm import BatchNorm2d


class MnistGate(nn.Module):
    """MNIST gate (A.1.1, kernel 3) and combined FMNIST+MNIST gate (A.1.2, kernel 5).

    conv 1->1 k, ReLU, max-pool, Linear ->128, ReLU, Linear 128->32; the original gate then
    has ReLU and Linear 32->E (26,063 parameters for MNIST with E = 5; 22,912 for the
    combined gate with E = 6); the attentive gate returns the fc2 output with no activation.
    """

    hidden_size = 32

    def __init__(self, num_experts: int, kernel_size: int = 3, attentive: bool = False):
        super().__init__()
        self.attentive = attentive
        pooled = (28 - kernel_size + 1) // 2
        self.conv = nn.Conv2d(1, 1, kernel_size)
        self.fc1 = nn.Linear(pooled * pooled, 128)
        self.fc2 = nn.Linear(128, 32)
        if not attentive:
            self.out = nn.Linear(32, num_experts)

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        z_BF = F.max_pool2d(F.relu(self.conv(x_B1HW)), 2).flatten(1)
        h_BH = self.fc2(F.relu(self.fc1(z_BF)))
        return h_BH if self.attentive else self.out(F.relu(h_BH))


class FmnistGate(nn.Module):
    """FashionMNIST gate (A.1.3): conv 1->8 k3, BatchNorm2d(8), ReLU, max-pool (1,352),
    Linear 1352->512, ReLU, Linear 512->32, ReLU, then Linear 32->E in the original gate.

    The attentive variant keeps the ReLU after fc2, as the reference code does ([FLAG-DISAGREE]
    in A.1.3: the paper says no activation). The reference attentive gate also defines an
    ``out`` layer that is never used; it is left out here (a parameter without gradient
    breaks DDP), so a gate distilled from it starts with a fresh ``out``, which is what the
    reference's never-trained layer amounts to (A.8).
    """

    hidden_size = 32

    def __init__(self, num_experts: int, attentive: bool = False):
        super().__init__()
        self.attentive = attentive
        self.conv = nn.Conv2d(1, 8, 3)
        self.bn = BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 13 * 13, 512)
        self.fc2 = nn.Linear(512, 32)
        if not attentive:
            self.out = nn.Linear(32, num_experts)

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        if fuses_conv_batchnorm(x_B1HW, self.conv, self.bn):  # training: fused (natively under global statistics)
            z_BF = conv_batchnorm_relu_pool(x_B1HW, self.conv, self.bn)
        else:
            z_BF = F.max_pool2d(F.relu(self.bn(self.conv(x_B1HW))), 2).flatten(1)
        h_BH = F.relu(self.fc2(F.relu(self.fc1(z_BF))))
        return h_BH if self.attentive else self.out(h_BH)


class CifarGate(nn.Module):
    """CIFAR-100 gate (A.1.4), f = 64, kernel 3, padding 1.

    conv 3->64, ReLU, pool; conv 64->128 (no bias), BN, ReLU, pool; conv 128->256, ReLU,
    pool; conv 256->512 (no bias), BN, ReLU, pool (2,048); Linear 2048->1024, ReLU;
    Linear 1024->256; original: ReLU, Linear 256->E; attentive: fc2's output as it is.
    """

    hidden_size = 256

    def __init__(self, num_experts: int, attentive: bool = False):
        super().__init__()
        self.attentive = attentive
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(128)
        self.conv3 = nn.Conv2d(128, 256, 3, padding=1)
        self.conv4 = nn.Conv2d(256, 512, 3, padding=1, bias=False)
        self.bn4 = BatchNorm2d(512)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, 256)
        if not attentive:
            self.out = nn.Linear(256, num_experts)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        z = F.max_pool2d(F.relu(self.conv1(x_B3HW)), 2)
        z = F.max_pool2d(F.relu(self.bn2(self.conv2(z))), 2)
        z = F.max_pool2d(F.relu(self.conv3(z)), 2)
        z = F.max_pool2d(F.relu(self.bn4(self.conv4(z))), 2)
        h_BH = self.fc2(F.relu(self.fc1(z.flatten(1))))
        return h_BH if self.attentive else self.out(F.relu(h_BH))


class PatchRouter(nn.Module):
    """Chen et al.'s router (docs/papers.md B.2): h_j(x) = sum_p <theta_j, x_p>, zero-initialised.

    The reference Conv1d(1 -> E, kernel = stride = patch_size, no bias) summed over patches
    is the same linear map applied once to the patch sum, which is how it runs here.
    """

    def __init__(self, num_experts: int, patch_size: int = 50):
        super().__init__()
        self.patch_size = patch_size
        self.linear = nn.Linear(patch_size, num_experts, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch_sum_BD = x.reshape(x.shape[0], -1, self.patch_size).sum(1)
        return self.linear(patch_sum_BD)


class ExpertAttention(nn.Module):
    """The attentive gate's attention over the experts (docs/papers.md A.1.5).

    Q = W_q g(x), K_e = W_k h_e(x) (h x h maps, no bias), s_e = <Q, K_e> / sqrt(h),
    p = softmax over experts. No value projection. Nothing is detached: the loss reaches the
    experts through their hidden states as well as their outputs.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.w_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.w_k = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, g_BH: torch.Tensor, hidden_EBH: torch.Tensor) -> torch.Tensor:
        q_BH = self.w_q(g_BH)
        k_EBH = self.w_k(hidden_EBH)
        scores_BE = torch.einsum("bh,ebh->be", q_BH, k_EBH) / math.sqrt(q_BH.shape[-1])
        return F.softmax(scores_BE, dim=-1)


class HierarchicalGate(nn.Module):
    """The two gates of a hierarchical mixture (docs/design.md, choice 2; Jordan and Jacobs'
    hierarchical mixtures of experts, with Shazeer et al.'s top-k selection at each level).

    ``group`` scores the G groups; ``expert`` scores all E = G * M experts, its logits read
    as G blocks of M, one within-group gate per group (each block is softmaxed on its own,
    so the expert gate is G gates sharing a trunk). Both are the architecture's gate, built
    with G and E outputs. ``forward(x) -> (group logits [B, G], expert logits [B, E])``.
    """

    def __init__(self, group: nn.Module, expert: nn.Module, num_groups: int):
        super().__init__()
        self.group = group
        self.expert = expert
        self.num_groups = num_groups

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.group(x), self.expert(x)
