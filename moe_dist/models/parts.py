"""The two parts of a model that ``train.freeze`` and ``train.init_parts`` name: experts and
gate, by state-dict prefix, and comparisons of a part between two states."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["PART_PREFIXES", "part_state", "part_parameter_names", "tensors_identical", "cpu_copy"]

#: State-dict prefixes of each part: a MoE's ``experts.*`` (a single model's ``expert.*``),
#: and the gate with the attentive gate's ``attention.*`` (W_q, W_k count as gate, docs/papers.md A.1.5).
PART_PREFIXES = {"experts": ("experts.", "expert."), "gate": ("gate.", "attention.")}


def part_state(state: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that belong to ``part``."""
    return {k: v for k, v in state.items() if k.startswith(PART_PREFIXES[part])}


def part_parameter_names(model: nn.Module, part: str) -> list[str]:
    """Names of the trainable parameters of ``part``. BatchNorm running statistics are
    buffers, not parameters: frozen parts still update them in train mode, as the reference
    code's do (docs/papers.md A.8 step 1), so freezing checks leave them out."""
    return [n for n, _ in model.named_parameters() if n.startswith(PART_PREFIXES[part])]


def tensors_identical(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: Iterable[str]) -> bool:
    """Whether every named tensor is present in both and bit-identical (and names is not empty)."""
    names = list(names)
    return bool(names) and all(n in a and n in b and torch.equal(a[n].cpu(), b[n].cpu()) for n in names)


def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (a snapshot that later training does not change)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}
