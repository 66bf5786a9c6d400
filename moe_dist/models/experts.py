"""The papers' expert networks: plain single-expert modules and their stacked expert banks.

Each architecture exists twice:

* a plain ``nn.Module`` exactly as docs/papers.md A.1 / B.2 describe it (the paper's way). It is
  the single-model baseline, the loop baseline of ``benchmarks/bench_experts.py`` and the
  reference of the equivalence tests. ``forward(x) -> (out_BC, hidden_BH)``.
* an :class:`ExpertBank` holding E such experts stacked along a leading expert dim and
  running them as one batched computation (design choice 1). Expert e of a bank is exactly
  the e-th single module it was built from; :meth:`ExpertBank.from_modules` and
  :meth:`ExpertBank.to_modules` copy weights and buffers both ways.

Checkpoint layout: dim 0 of every parameter and buffer of a bank is the expert dim, and
their names are the single module's state-dict keys (``conv1.weight``, ``bn2.running_mean``,
``bn2.num_batches_tracked`` ...). ``bank.state_dict()[k][e]`` is expert e's ``k``, so a
checkpoint splits by global expert id and a rank holding experts ``a..b`` loads the slice
``[a:b]``.

Shape legend: B batch; E experts; N rows per expert batch; C classes; H hidden size (the
vector the attentive gate reads); F flattened features; D patch length.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import check_choice
from moe_dist.models.layers import (StackedBatchNorm2d, StackedConv2d, StackedConvReluPool,
                                    StackedLinear, StackedPatchConv1d)
from moe_dist.parallel.batchnorm import BatchNorm2d

# --------------------------------------------------------------------------- single experts


class MnistExpert(nn.Module):
    """The MNIST-family expert (docs/papers.md A.1.1, A.1.2, A.1.3).

    conv 1->1 k3, ReLU, max-pool (13x13 = 169), Linear 169->``hidden_size``, ReLU,
    Linear ->32 (its pre-ReLU output is the attention's hidden state), ReLU,
    Linear 32->``num_classes``, softmax. MNIST: hidden_size 5, 10 classes (1,382 parameters);
    FashionMNIST: hidden_size 64; combined FMNIST+MNIST: hidden_size 5, 12 classes (1,448).
    """

    def __init__(self, num_classes: int = 10, hidden_size: int = 5):
        super().__init__()
        self.init_kwargs = {"num_classes": num_classes, "hidden_size": hidden_size}
        self.conv1 = nn.Conv2d(1, 1, 3)
        self.fc1 = nn.Linear(169, hidden_size)
        self.fc2 = nn.Linear(hidden_size, 32)
        self.out = nn.Linear(32, num_classes)

    def forward(self, x_B1HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_BF = F.max_pool2d(F.relu(self.conv1(x_B1HW)), 2).flatten(1)
        hidden_BH = self.fc2(F.relu(self.fc1(z_BF)))
        return F.softmax(self.out(F.relu(hidden_BH)), dim=1), hidden_BH


class CifarExpert(nn.Module):
    """The CIFAR-100 expert (docs/papers.md A.1.4), f = 16, kernel 3, padding 1.

    conv 3->16, ReLU, pool; conv 16->32 (no bias), BN, ReLU, pool; conv 32->64, ReLU, pool;
    conv 64->128 (no bias), BN, ReLU, pool (2x2x128 = 512); Linear 512->1024, ReLU;
    Linear 1024->256 (pre-ReLU output = hidden state); ReLU; Linear 256->100; softmax.
    """

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.init_kwargs = {"num_classes": num_classes}
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn4 = BatchNorm2d(128)
        self.fc1 = nn.Linear(512, 1024)
        self.fc2 = nn.Linear(1024, 256)
        self.out = nn.Linear(256, num_classes)

    def forward(self, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.max_pool2d(F.relu(self.conv1(x_B3HW)), 2)
        z = F.max_pool2d(F.relu(self.bn2(self.conv2(z))), 2)
        z = F.max_pool2d(F.relu(self.conv3(z)), 2)
        z = F.max_pool2d(F.relu(self.bn4(self.conv4(z))), 2)
        hidden_BH = self.fc2(F.relu(self.fc1(z.flatten(1))))
        return F.softmax(self.out(F.relu(hidden_BH)), dim=1), hidden_BH


def _activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    return z.pow(3) if activation == "cubic" else z


class PatchExpert(nn.Module):
    """Chen et al.'s two-layer patch CNN (docs/papers.md B.2), the expert and the single model.

    Conv1d(1 -> 2m, kernel = stride = patch_size, with bias) applied to each patch, then
    sigma(z) = z^3 (``cubic``) or z (``linear``), summed over patches; the class-0 logit is the
    sum of the first m filters, the class-1 logit the sum of the last m. Returns logits and
    the ``2m`` patch-summed filter responses as the hidden state.
    """

    def __init__(self, width: int = 8, activation: str = "cubic", patch_size: int = 50):
        super().__init__()
        check_choice("model.expert_activation", activation)
        self.init_kwargs = {"width": width, "activation": activation, "patch_size": patch_size}
        self.activation = activation
        self.conv = nn.Conv1d(1, 2 * width, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        z_BOL = self.conv(x.reshape(B, 1, -1))
        hidden_BO = _activation(z_BOL, self.activation).sum(-1)
        return hidden_BO.view(B, 2, -1).sum(-1), hidden_BO


# --------------------------------------------------------------------------- expert banks


class ExpertBank(nn.Module):
    """E experts of one architecture, parameters stacked on dim 0, run in one computation.

    ``forward(x, shared, mask_EN=None) -> (out_ENC, hidden_ENH)``:

    * ``shared=True``: x is ``[N, ...]`` and every expert sees all of it (dense routing);
    * ``shared=False``: x is ``[E, N, ...]``, each expert its own (padded) batch, as top-k
      dispatch and expert parallelism produce; ``mask_EN`` marks real rows (1) and padding
      (0) so that BatchNorm statistics ignore the padding.

    Subclasses name ``expert_class`` (the single-expert module) and build their stacked
    layers in ``_build`` under the single module's layer names.
    """

    expert_class: ClassVar[type[nn.Module]]

    def __init__(self, experts: Sequence[nn.Module]):
        super().__init__()
        if not experts:
            raise ValueError("an expert bank needs at least one expert")
        self.num_experts = len(experts)
        self.expert_kwargs: dict[str, Any] = dict(experts[0].init_kwargs)
        like = next(experts[0].parameters())
        with torch.device(like.device):
            self._build(self.num_experts, **self.expert_kwargs)
        self.to(like.dtype)
        states = [e.state_dict() for e in experts]
        self.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})

    def _build(self, num_experts: int, **expert_kwargs: Any) -> None:
        raise NotImplementedError

    @classmethod
    def new_expert(cls, init_scale: float = 1.0, **expert_kwargs: Any) -> nn.Module:
        """One default-initialised single expert (the paper's init), its weights and biases
        multiplied by ``init_scale`` (Chen et al.'s "small init" of 0.001, docs/papers.md B.2)."""
        expert = cls.expert_class(**expert_kwargs)
        if init_scale != 1.0:
            with torch.no_grad():
                for p in expert.parameters():
                    p.mul_(init_scale)
        return expert

    @classmethod
    def create(cls, num_experts: int, init_scale: float = 1.0, **expert_kwargs: Any) -> ExpertBank:
        """E freshly constructed experts stacked: expert e equals the e-th
        ``new_expert(init_scale, **expert_kwargs)`` drawn after the same seed."""
        return cls([cls.new_expert(init_scale, **expert_kwargs) for _ in range(num_experts)])

    @classmethod
    def from_modules(cls, experts: Sequence[nn.Module]) -> ExpertBank:
        """Stack the weights and buffers of single-expert modules (copies; they stay independent)."""
        return cls(experts)

    def to_modules(self) -> list[nn.Module]:
        """One single-expert module per expert, holding copies of its weights and buffers."""
        any_float = next(self.parameters())
        state = self.state_dict()
        modules = []
        for e in range(self.num_experts):
            with torch.device("meta"):  # no initialisation work, no RNG draws
                module = self.expert_class(**self.expert_kwargs)
            module = module.to_empty(device=any_float.device).to(any_float.dtype)
            module.load_state_dict({k: v[e] for k, v in state.items()})
            modules.append(module)
        return modules


class MnistExpertBank(ExpertBank):
    """Stacked :class:`MnistExpert` (docs/papers.md A.1.1-A.1.3).

    The conv + ReLU + max-pool block is fused (:class:`StackedConvReluPool`); what follows
    is three ``baddbmm`` calls on ``[E, N, F]``.
    """

    expert_class = MnistExpert

    def _build(self, num_experts: int, num_classes: int, hidden_size: int) -> None:
        self.conv1 = StackedConvReluPool(num_experts, 1, 1, 3)
        self.fc1 = StackedLinear(num_experts, 169, hidden_size)
        self.fc2 = StackedLinear(num_experts, hidden_size, 32)
        self.out = StackedLinear(num_experts, 32, num_classes)

    def forward(self, x: torch.Tensor, shared: bool,
                mask_EN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z_ENF = self.conv1(x, shared)
        hidden_ENH = self.fc2(F.relu(self.fc1(z_ENF)))
        return F.softmax(self.out(F.relu(hidden_ENH)), dim=-1), hidden_ENH


class CifarExpertBank(ExpertBank):
    """Stacked :class:`CifarExpert` (docs/papers.md A.1.4): grouped convolutions on
    ``[N, E*C, H, W]``, per-expert BatchNorm over the E*C channels (masked for padded
    batches), then ``baddbmm`` on ``[E, N, F]``.

    Max-pool runs before ReLU here (4x fewer ReLU elements); the two orders give the same
    values and gradients, see ``layers._ConvReluPool``.
    """

    expert_class = CifarExpert

    @staticmethod
    def _grouped(x: torch.Tensor, shared: bool) -> torch.Tensor:
        """Input in the layout of a stacked convolution: ``[N, C, H, W]`` when shared,
        else ``[E, N, C, H, W] -> [N, E*C, H, W]`` (expert e's channels side by side)."""
        if shared:
            return x
        E, N = x.shape[:2]
        return x.transpose(0, 1).reshape(N, E * x.shape[2], *x.shape[3:])

    def _build(self, num_experts: int, num_classes: int) -> None:
        E = num_experts
        self.conv1 = StackedConv2d(E, 3, 16, 3, padding=1)
        self.conv2 = StackedConv2d(E, 16, 32, 3, padding=1, bias=False)
        self.bn2 = StackedBatchNorm2d(E, 32)
        self.conv3 = StackedConv2d(E, 32, 64, 3, padding=1)
        self.conv4 = StackedConv2d(E, 64, 128, 3, padding=1, bias=False)
        self.bn4 = StackedBatchNorm2d(E, 128)
        self.fc1 = StackedLinear(E, 512, 1024)
        self.fc2 = StackedLinear(E, 1024, 256)
        self.out = StackedLinear(E, 256, num_classes)

    def forward(self, x: torch.Tensor, shared: bool,
                mask_EN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        E = self.num_experts
        z = F.relu(F.max_pool2d(self.conv1(self._grouped(x, shared), shared), 2))
        z = F.relu(F.max_pool2d(self.bn2(self.conv2(z, False), mask_EN), 2))
        z = F.relu(F.max_pool2d(self.conv3(z, False), 2))
        z = F.relu(F.max_pool2d(self.bn4(self.conv4(z, False), mask_EN), 2))
        N = z.shape[0]
        z_ENF = z.reshape(N, E, -1).transpose(0, 1)  # [N, E*128, 2, 2] -> [E, N, 512]
        hidden_ENH = self.fc2(F.relu(self.fc1(z_ENF)))
        return F.softmax(self.out(F.relu(hidden_ENH)), dim=-1), hidden_ENH


class PatchExpertBank(ExpertBank):
    """Stacked :class:`PatchExpert` (docs/papers.md B.2): all experts' filters on all patches
    in one matrix product."""

    expert_class = PatchExpert

    def _build(self, num_experts: int, width: int, activation: str, patch_size: int) -> None:
        self.activation = activation
        self.conv = StackedPatchConv1d(num_experts, 2 * width, patch_size)

    def forward(self, x: torch.Tensor, shared: bool,
                mask_EN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_ENO = _activation(self.conv(x, shared), self.activation).sum(2)
        E, N, _ = hidden_ENO.shape
        return hidden_ENO.view(E, N, 2, -1).sum(-1), hidden_ENO
