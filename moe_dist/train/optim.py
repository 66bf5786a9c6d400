"""Optimizers and learning-rate schedules of the two papers.

Legend: E = experts (dim 0 of every expert-bank tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.config import Config, check_choice


class NormalizedGD(torch.optim.Optimizer):
    """Chen et al.'s normalised gradient descent (docs/papers.md B.3).

    For groups with ``normalize=True`` the gradient of expert j is divided by G_j before a
    plain SGD step. ``scope="expert"``: G_j = sum over the expert's tensors of the tensor's
    gradient norm (the demos' ``NormalizedGD``: ||dW_j|| + ||db_j||). ``scope="tensor"``: each
    tensor slice by its own norm (the entropy notebooks). Expert-bank tensors stack the experts
    along dim 0, so the per-expert norms are per-slice norms. Groups with ``normalize=False``
    (the router) take plain SGD steps.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 scope: str = "expert"):
        check_choice("train.normalized_gd_scope", scope)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, normalize=True)
        super().__init__(params, defaults)
        self.scope = scope

    def _normalise(self, grads: list[torch.Tensor]) -> None:
        norms = [g.flatten(1).norm(dim=1) for g in grads]  # each [E]
        if self.scope == "expert":
            total_E = torch.stack(norms).sum(0)
            norms = [total_E] * len(grads)
        for g, n_E in zip(grads, norms):
            scale_E = torch.where(n_E > 0, 1.0 / n_E, torch.ones_like(n_E))
            g.mul_(scale_E.view(-1, *([1] * (g.dim() - 1))))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["normalize"]:
                self._normalise([p.grad for p in params])
            for p in params:
                d_p = p.grad
                if group["weight_decay"]:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-group["lr"])
        return loss


def _groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Expert and gate parameter groups, leaving out the frozen ones (train.freeze)."""
    frozen = set(cfg.train.freeze)
    gate_lr = cfg.train.gate_lr or cfg.train.lr
    expert_params = list(model.expert_parameters())
    gate_params = list(model.gate_parameters())
    groups = []
    for name, params, lr in (("experts", expert_params, cfg.train.lr), ("gate", gate_params, gate_lr)):
        for p in params:
            p.requires_grad_(name not in frozen)
        if params and name not in frozen:
            groups.append({"params": params, "lr": lr, "name": name})
    if not groups:
        raise ValueError("train.freeze leaves no parameter to train")
    return groups


def build_optimizer(model: nn.Module, cfg: Config, split_groups=None) -> torch.optim.Optimizer:
    """The configured optimizer over the expert and gate groups. ``split_groups``, if given,
    maps the list of groups to the list the optimizer gets (the DeepSpeed engine puts the
    sharded expert parameters in groups of their own)."""
    t = cfg.train
    groups = _groups(model, cfg)
    if split_groups is not None:
        groups = [g for g in split_groups(groups) if g["params"]]
    if t.optimizer == "adam":
        # One fused kernel over all tensors instead of ~10 element-wise ops per parameter (on
        # CPU the default is that per-parameter loop); every engine alike, so that their
        # checkpoints hold the same optimizer settings.
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    for g in groups:  # normalized_gd: only the experts are normalised; the router takes plain SGD
        g["normalize"] = (g["name"] == "experts" or g.get("moe", False)) and cfg.model.kind == "moe"
    return NormalizedGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                        scope=t.normalized_gd_scope)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    """The paper's step schedule: lr / factor after every N epochs (docs/papers.md A.4); stepped per epoch."""
    every = cfg.train.lr_decay_every or 10**9
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=1.0 / cfg.train.lr_decay_factor)
