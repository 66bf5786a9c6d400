"""Build the model a config describes: a MoE (expert bank + gate) or a single model.

Construction order under one seed: the experts (expert 0 first), then the gate, then the
attention, as the reference notebooks create them (docs/papers.md A.6 step 1); hierarchical
routing: the experts, the group gate, then the expert gate.
"""

from __future__ import annotations

import math

from torch import nn

from moe_dist.config import LossConfig, ModelConfig, MoEConfig, check_choice, check_routing_fits_arch
from moe_dist.errors import ConfigError
from moe_dist.models.experts import CifarExpertBank, ExpertBank, MnistExpertBank, PatchExpertBank
from moe_dist.models.gates import CifarGate, ExpertAttention, FmnistGate, HierarchicalGate, MnistGate, PatchRouter
from moe_dist.models.moe import MoE, SingleModel

#: Classes each architecture predicts (docs/papers.md A.1, B.2).
ARCH_CLASSES = {"mnist": 10, "fmnist": 10, "fmnist_mnist": 12, "cifar100": 100, "patch_cnn": 2}
#: Per-sample input shape of the image architectures.
ARCH_INPUT_SHAPES = {"mnist": (1, 28, 28), "fmnist": (1, 28, 28), "fmnist_mnist": (1, 28, 28),
                     "cifar100": (3, 32, 32)}
PATCH_SIZE = 50  # Chen et al.: d = 50 (B.1)
PATCH_WIDTH_MOE, PATCH_WIDTH_SINGLE = 8, 40  # m, filters per class (B.2)


def _check_data(arch: str, num_classes: int, input_shape: tuple) -> None:
    if ARCH_CLASSES[arch] != num_classes:
        raise ConfigError(f"model.arch={arch!r} predicts {ARCH_CLASSES[arch]} classes, "
                          f"but the data has {num_classes}")
    if arch == "patch_cnn":
        if math.prod(input_shape) % PATCH_SIZE:
            raise ConfigError(f"model.arch='patch_cnn' needs inputs made of {PATCH_SIZE}-long "
                              f"patches, got input shape {tuple(input_shape)}")
    elif tuple(input_shape) != ARCH_INPUT_SHAPES[arch]:
        raise ConfigError(f"model.arch={arch!r} expects inputs of shape {ARCH_INPUT_SHAPES[arch]}, "
                          f"got {tuple(input_shape)}")


def _expert_spec(model_cfg: ModelConfig, num_classes: int) -> tuple[type[ExpertBank], dict]:
    """The expert bank class of an architecture and its single expert's constructor arguments."""
    arch = model_cfg.arch
    if arch == "patch_cnn":
        width = model_cfg.width or (PATCH_WIDTH_MOE if model_cfg.kind == "moe" else PATCH_WIDTH_SINGLE)
        return PatchExpertBank, {"width": width, "activation": model_cfg.expert_activation,
                                 "patch_size": PATCH_SIZE}
    if arch == "cifar100":
        return CifarExpertBank, {"num_classes": num_classes}
    return MnistExpertBank, {"num_classes": num_classes, "hidden_size": 64 if arch == "fmnist" else 5}


def _gate(arch: str, num_experts: int, attentive: bool) -> nn.Module:
    if arch == "patch_cnn":
        return PatchRouter(num_experts, PATCH_SIZE)
    if arch == "fmnist":
        return FmnistGate(num_experts, attentive=attentive)
    if arch == "cifar100":
        return CifarGate(num_experts, attentive=attentive)
    return MnistGate(num_experts, kernel_size=5 if arch == "fmnist_mnist" else 3, attentive=attentive)


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig, loss_cfg: LossConfig,
                num_classes: int, input_shape: tuple) -> nn.Module:
    """A :class:`MoE` (model.kind=moe) or :class:`SingleModel` (model.kind=single).

    ``model.expert_init_scale`` multiplies the initial expert weights in both kinds. The
    patch_cnn MoE always uses Chen's router; ``moe.gate_weights`` picks how the chosen
    experts are combined. Raises ConfigError for combinations that do not exist.
    """
    arch = model_cfg.arch
    check_choice("model.arch", arch)  # the config's rules: sections may come without validate()
    _check_data(arch, num_classes, input_shape)
    bank_class, expert_kwargs = _expert_spec(model_cfg, num_classes)
    output_kind = "logits" if arch == "patch_cnn" else "probs"
    if model_cfg.kind == "single":
        return SingleModel(bank_class.new_expert(model_cfg.expert_init_scale, **expert_kwargs),
                           output_kind)

    E = moe_cfg.num_experts
    check_routing_fits_arch(moe_cfg.routing, arch)  # MoE checks moe.top_k itself
    attentive = moe_cfg.routing == "attentive"
    experts = bank_class.create(E, model_cfg.expert_init_scale, **expert_kwargs)
    if moe_cfg.routing == "hierarchical":  # a group gate, then the expert gate (docs/design.md, choice 2)
        gate = HierarchicalGate(_gate(arch, moe_cfg.num_groups, False), _gate(arch, E, False), moe_cfg.num_groups)
    else:
        gate = _gate(arch, E, attentive)
    attention = ExpertAttention(gate.hidden_size) if attentive else None
    return MoE(experts, gate, routing=moe_cfg.routing, output_kind=output_kind, attention=attention,
               top_k=moe_cfg.top_k, gate_weights=moe_cfg.gate_weights, noise=moe_cfg.noise,
               noise_std=moe_cfg.noise_std, eval_noise=moe_cfg.eval_noise,
               temperature=moe_cfg.temperature, importance_weight=loss_cfg.importance_weight,
               ls_beta=loss_cfg.ls_beta, ls_gamma=loss_cfg.ls_gamma,
               ls_variant=loss_cfg.ls_variant, ls_squared=loss_cfg.ls_squared,
               capacity_factor=moe_cfg.capacity_factor, num_groups=moe_cfg.num_groups,
               top_groups=moe_cfg.top_groups)
