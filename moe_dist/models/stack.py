"""Stacked runs: R models of one architecture trained as one computation (issue "Many runs as
one"; docs/design.md, choice 9).

The R *members* are ordinary models (:class:`~moe_dist.models.moe.MoE` or
:class:`~moe_dist.models.moe.SingleModel`), each built from its own seed. :func:`stack_models`
puts their tensors into shared storage and returns a :class:`ModelStack` whose forward runs
every member at once on the members' batches laid end to end (``[R*B, ...]``, member r at
rows ``r*B .. (r+1)*B``):

* the experts of all members form one expert bank of R*E experts (member r's expert e is
  expert ``r*E + e``): top-k routing offsets each member's choices by ``r*E`` and reuses the
  one-process dispatch over that bank;
* ``mode="loop"`` (the default on CPU): the gates, and the experts under dense routing, run
  member by member, as R plain computations (on a CPU a convolution with a weight per
  member, or each expert's own copy of the input's im2col columns, costs more than R
  plain calls save);
* ``mode="vmap"`` (the default on CUDA, where per-kernel overhead dominates these small
  models): the gates run as one ``torch.func.vmap`` over parameters stacked on a leading
  member dim, and dense routing runs the R*E bank once on each member's rows;
* the gate losses and the routing noise are each member's own (:class:`StackedDispatch`):
  every member keeps its loss weights, noise scale and random generator.

Every member tensor then *is* a view of the shared storage: a member's optimizer steps its
own parameters in place, a member's ``state_dict()`` and ``load_state_dict()`` read and write
the shared values, and evaluating a member is calling it. After a backward pass through the
stack, :meth:`ModelStack.share_gradients` hands each member its slices of the gradients.
Members are independent: no operation mixes two members' rows or tensors, so a member whose
loss is NaN leaves the others' gradients finite.

Shape legend: R members; B samples per member; E experts per member; K experts chosen per
sample; C classes; H hidden size.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from moe_dist import losses
from moe_dist.models.experts import ExpertBank
from moe_dist.models.moe import MoE, MoEOutput, SingleModel
from moe_dist.parallel.dispatch import BatchLayout, LocalDispatch, routing_capacity

__all__ = ["MemberSettings", "ModelStack", "StackedDispatch", "stack_models", "MODES"]

MODES = ("loop", "vmap")


@dataclass(frozen=True)
class MemberSettings:
    """What may differ between the members of one stack, besides seed and learning rate: the
    gate losses (L_s's variant too) and the routing-noise scale."""

    importance_weight: float = 0.0
    ls_beta: float = 0.0
    ls_gamma: float = 0.0
    noise_std: float = 1.0
    ls_variant: str = "normalized"
    ls_squared: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> MemberSettings:
        if not isinstance(model, MoE):
            return cls()
        return cls(model.importance_weight, model.ls_beta, model.ls_gamma, model.noise_std, model.ls_variant,
                   model.ls_squared)


# ----------------------------------------------------------------------------- shared storage


@dataclass
class _Shared:
    """One stacked tensor and where each member sees its slice."""

    stacked: torch.Tensor
    owners: list[tuple[nn.Module, str, slice | int]]  # (module, tensor name, index into stacked)


def _point_at(stacked: torch.Tensor, owners: list[tuple[nn.Module, str, slice | int]], parameter: bool) -> _Shared:
    """Make each owner's tensor ``name`` the view ``stacked[index]`` (a parameter becomes a
    leaf sharing the storage, so its optimizer's in-place steps write the stacked values)."""
    for module, leaf, index in owners:
        view = stacked.detach()[index]
        if parameter:
            module._parameters[leaf] = nn.Parameter(view, requires_grad=stacked.requires_grad)
        else:
            module._buffers[leaf] = view
    return _Shared(stacked, owners)


def _share_module(modules: Sequence[nn.Module]) -> tuple[list[_Shared], list[_Shared]]:
    """Every parameter and buffer of ``modules`` (one architecture) stacked on a new leading
    member dim, the modules' own tensors becoming views of their slices."""
    shared: tuple[list[_Shared], list[_Shared]] = ([], [])
    for kind, out in (("parameters", shared[0]), ("buffers", shared[1])):
        for name, first in getattr(modules[0], f"named_{kind}")():
            path, _, leaf = name.rpartition(".")
            owners = [(m.get_submodule(path) if path else m, leaf, r) for r, m in enumerate(modules)]
            stacked = torch.stack([getattr(o, leaf).detach() for o, _, _ in owners])
            if kind == "parameters":
                stacked = nn.Parameter(stacked, requires_grad=first.requires_grad)
            out.append(_point_at(stacked, owners, kind == "parameters"))
    return shared


# ----------------------------------------------------------------------------- gates


class _MemberRows:
    """Member r's rows of the last stacked input, the same view objects for every caller of
    one forward pass, so that a member's gate and its experts see one tensor (and the
    experts reuse the gate's im2col columns, ``moe_dist.models.layers.shared_pool_phase_columns``)."""

    def __init__(self) -> None:
        self.source: weakref.ref | None = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, members: int) -> list[torch.Tensor]:
        if self.source is None or self.source() is not x or len(self.rows) != members:
            self.source, self.rows = weakref.ref(x), list(x.chunk(members))
        return self.rows


member_rows = _MemberRows()



class StackedGate(nn.Module):
    """The members' gates on their own rows: ``[R*B, ...] -> [R*B, E]`` (or ``[R*B, H]``)."""

    def __init__(self, gates: Sequence[nn.Module], mode: str):
        super().__init__()
        self.mode = mode
        self.num_members = len(gates)
        # the members' own gates (their tensors are the members'; registered so that the MoE
        # reads their dtype and train() reaches them)
        self.members = nn.ModuleList(gates)
        self.shared: list[_Shared] = []
        if mode == "vmap":
            params, buffers = _share_module(gates)
            self.shared = params + buffers
            self._params = {n: s.stacked for (n, _), s in zip(gates[0].named_parameters(), params)}
            self._buffers_stacked = {n: s.stacked for (n, _), s in zip(gates[0].named_buffers(), buffers)}
            self.__dict__["template"] = copy.deepcopy(gates[0]).to("meta")

    def train(self, mode: bool = True) -> StackedGate:
        super().train(mode)
        if self.mode == "vmap":  # not a submodule: its meta tensors are never saved or moved
            self.template.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] // self.num_members
        if self.mode == "loop":
            return torch.cat([gate(x_r) for x_r, gate in zip(member_rows(x, self.num_members), self.members)])
        x_RB = x.view(self.num_members, rows, *x.shape[1:])

        def one(params, buffers, x_B):
            return torch.func.functional_call(self.template, (params, buffers), (x_B,))
        out_RB = torch.func.vmap(one)(self._params, self._buffers_stacked, x_RB)
        return out_RB.flatten(0, 1)


class StackedAttention(nn.Module):
    """Each member's expert attention (docs/papers.md A.1.5) on its rows."""

    def __init__(self, attentions: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(attentions)

    def forward(self, g_BH: torch.Tensor, hidden_EBH: torch.Tensor) -> torch.Tensor:
        rows = g_BH.shape[0] // len(self.members)
        return torch.cat([att(g_BH[r * rows:(r + 1) * rows], hidden_EBH[:, r * rows:(r + 1) * rows])
                          for r, att in enumerate(self.members)])


# ----------------------------------------------------------------------------- dispatch


class StackedDispatch(LocalDispatch):
    """The one-process dispatch of R members whose experts are one bank of R*E experts.

    The gate losses come back as ``[R]`` (member r's weighted loss; 0 for a member whose
    weights are 0) and the routing noise is drawn from each member's generator, scaled by
    its ``noise_std`` (the stacked MoE adds it with a scale of 1).
    """

    def __init__(self, settings: Sequence[MemberSettings], experts_per_member: int,
                 generators: Sequence[torch.Generator], member_banks: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        # loop mode: the members' own banks (views of the stacked one) run dense routing
        self.member_banks = list(member_banks) if member_banks is not None else None
        self.settings = list(settings)
        self.num_members = len(settings)
        self.experts_per_member = experts_per_member
        self.generators = list(generators)
        self.member_stats: dict[str, list[int]] = {}

    def noise(self, kind: str, logits_BE: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        rows = logits_BE.shape[0] // self.num_members
        draw = torch.randn if kind == "gaussian" else torch.rand
        parts = [draw((rows, logits_BE.shape[1]), generator=g, dtype=logits_BE.dtype, device=logits_BE.device)
                 for g in self.generators]
        if kind == "gaussian":
            parts = [p * s.noise_std for p, s in zip(parts, self.settings)]
        return torch.cat(parts)

    def dense(self, experts, x: torch.Tensor, layout: BatchLayout, need_hidden: bool):
        R, E = self.num_members, self.experts_per_member
        rows = x.shape[0] // R
        if self.member_banks is not None:  # each member's E experts share its rows' im2col work
            outs = [bank(x_r, shared=True) for x_r, bank in zip(member_rows(x, R), self.member_banks)]
            hidden = None if outs[0][1] is None else torch.cat([h for _, h in outs], dim=1)
            return torch.cat([o for o, _ in outs], dim=1), hidden
        x_REB = x.view(R, 1, rows, *x.shape[1:]).expand(R, E, rows, *x.shape[1:])
        out, hidden = experts(x_REB.reshape(R * E, rows, *x.shape[1:]), shared=False)

        def by_expert(t: torch.Tensor | None) -> torch.Tensor | None:  # [R*E, B, F] -> [E, R*B, F]
            return None if t is None else t.reshape(R, E, rows, -1).transpose(0, 1).reshape(E, R * rows, -1)
        return by_expert(out), by_expert(hidden)

    def topk(self, experts, x: torch.Tensor, index_BK: torch.Tensor, num_experts: int,
             capacity_factor: float = 0.0, weights_BK: torch.Tensor | None = None, need_top: bool = False):
        R, E = self.num_members, self.experts_per_member
        rows = x.shape[0] // R
        member_B = torch.arange(R, device=x.device).repeat_interleave(rows)
        flat_BK = index_BK + (member_B * E).unsqueeze(1)
        result = super().topk(experts, x, flat_BK, num_experts, capacity_factor, weights_BK, need_top)
        counts_RE = result[-2].view(R, E)
        self.member_stats = self._member_stats(counts_RE, index_BK.shape[1], rows, capacity_factor, experts, x)
        return (*result[:-2], counts_RE, result[-1])

    def _member_stats(self, counts_RE, K: int, rows: int, capacity_factor: float, experts, x) -> dict[str, list[int]]:
        """Each member's routing statistics as its own run would count them (moe_dist.parallel.dispatch._stats)."""
        kept_RE = counts_RE
        if capacity_factor > 0:
            kept_RE = counts_RE.clamp(max=routing_capacity(capacity_factor, rows * K, self.experts_per_member))
        kept_R = kept_RE.sum(1)
        grouped = getattr(experts, "supports_grouped", None)
        if grouped is not None and grouped(x):
            padded_R = kept_R  # ragged expert batches: no padding
        else:
            padded_R = kept_RE.max(1).values.clamp(min=1) * self.experts_per_member
        routed = rows * K
        return {"routed": [routed] * self.num_members, "dropped": (routed - kept_R).tolist(),
                "expert_rows": kept_R.tolist(), "padded_rows": padded_R.tolist()}

    def importance_loss(self, probs_BE: torch.Tensor, weight: float) -> torch.Tensor:
        return self._per_member(probs_BE, lambda p, s: losses.importance_loss(p, s.importance_weight)
                                if s.importance_weight > 0 else None)

    def sample_similarity_loss(self, x_BD, probs_BE, layout, beta, gamma, variant, squared) -> torch.Tensor:
        rows = x_BD.shape[0] // self.num_members

        def one(r: int, p: torch.Tensor, s: MemberSettings):
            if s.ls_beta <= 0 and s.ls_gamma <= 0:
                return None
            return losses.sample_similarity_loss(x_BD[r * rows:(r + 1) * rows], p, s.ls_beta, s.ls_gamma,
                                                 variant=s.ls_variant, squared=s.ls_squared)
        return self._per_member(probs_BE, one, with_index=True)

    def _per_member(self, probs_BE: torch.Tensor, loss: Callable, with_index: bool = False) -> torch.Tensor:
        rows = probs_BE.shape[0] // self.num_members
        values = []
        for r, s in enumerate(self.settings):
            p = probs_BE[r * rows:(r + 1) * rows]
            value = loss(r, p, s) if with_index else loss(p, s)
            values.append(probs_BE.new_zeros(()) if value is None else value)
        return torch.stack(values)


# ----------------------------------------------------------------------------- the stack


class ModelStack(nn.Module):
    """R members as one computation; see the module docstring. ``forward(x [R*B, ...])``
    returns one :class:`MoEOutput` over all rows; :meth:`member_output` cuts member r's."""

    def __init__(self, members: Sequence[nn.Module], network: nn.Module, shared: list[_Shared],
                 dispatch: StackedDispatch | None) -> None:
        super().__init__()
        self.members = list(members)  # not submodules: each member is trained and saved on its own
        self.network = network
        self.shared = shared
        self.dispatch = dispatch

    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        return self.network(x)

    def share_gradients(self) -> None:
        """Give each member parameter its slice of the stacked gradient (after backward); a
        parameter the forward used directly (a gate in loop mode) already has its own."""
        for s in self.shared:
            grad = s.stacked.grad if isinstance(s.stacked, nn.Parameter) else None
            if grad is None:
                continue
            for owner, name, index in s.owners:
                owner._parameters[name].grad = grad[index]
            s.stacked.grad = None

    def member_output(self, out: MoEOutput, r: int) -> MoEOutput:
        """Member r's rows and values of a stacked forward, as its own forward returns them."""
        rows = out.output.shape[0] // self.num_members
        cut = slice(r * rows, (r + 1) * rows)

        def rows_of(t):
            return None if t is None else t[cut]
        member = self.members[r]
        fields = dict(output=out.output[cut], gate_probs=rows_of(out.gate_probs),
                      expert_index=rows_of(out.expert_index), top_expert_output=rows_of(out.top_expert_output),
                      expert_outputs=None if out.expert_outputs is None else out.expert_outputs[:, cut])
        if isinstance(member, MoE):
            fields["samples_per_expert"] = self._member_counts(out, r, fields["expert_index"])
            fields["aux_losses"] = {k: v[r] for k, v in out.aux_losses.items() if _uses(member, k)}
            fields["routing_stats"] = {k: v[r] for k, v in self.dispatch.member_stats.items()} \
                if out.routing_stats else {}
        return replace(out, **fields)

    def _member_counts(self, out: MoEOutput, r: int, index_BK: torch.Tensor) -> torch.Tensor:
        counts = out.samples_per_expert
        if counts is not None and counts.dim() == 2:  # top-k: [R, E] from the dispatch
            return counts[r]
        return torch.bincount(index_BK[:, 0], minlength=self.dispatch.experts_per_member)


def _uses(member: MoE, loss: str) -> bool:
    if loss == "importance":
        return member.importance_weight > 0
    return member.ls_beta > 0 or member.ls_gamma > 0


def _check_members(models: Sequence[nn.Module]) -> None:
    first = models[0]
    for m in models[1:]:
        if type(m) is not type(first) or [n for n, _ in m.named_parameters()] != [n for n, _ in first.named_parameters()]:
            raise ValueError("stacked members must share one architecture")
    if isinstance(first, MoE):
        if first.routing == "hierarchical":
            raise ValueError("moe.routing='hierarchical' cannot be stacked (its two gates are not stacked yet): "
                             "run its members one by one")
        if not isinstance(first.dispatcher, LocalDispatch) or first.dispatcher.distributed:
            raise ValueError("stacked runs are one process: expert-parallel members cannot be stacked")


def stack_models(models: Sequence[nn.Module], generators: Sequence[torch.Generator] | None = None,
                 mode: str | None = None) -> ModelStack:
    """Stack ``models`` (already on their device and dtype); see the module docstring.
    ``generators``: each member's routing-noise generator (needed when the MoE adds noise)."""
    _check_members(models)
    first = models[0]
    device = next(first.parameters()).device
    mode = mode or ("vmap" if device.type == "cuda" else "loop")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of: {', '.join(MODES)}")
    if isinstance(first, SingleModel):
        bank = _bank_of([m.expert for m in models], [m.expert for m in models], singles=True)
        network = _StackedSingle(bank.bank, first.output_kind, len(models))
        return ModelStack(models, network, bank.shared, None)
    bank = _bank_of([e for m in models for e in m.experts.to_modules()], [m.experts for m in models])
    gens = list(generators) if generators is not None else [torch.Generator(device=device) for _ in models]
    dispatch = StackedDispatch([MemberSettings.of(m) for m in models], first.num_experts, gens,
                               [m.experts for m in models] if mode == "loop" else None)
    gate = StackedGate([m.gate for m in models], mode)
    attention = StackedAttention([m.attention for m in models]) if first.attention is not None else None
    network = MoE(bank.bank, gate, routing=first.routing, output_kind=first.output_kind, attention=attention,
                  top_k=first.top_k, gate_weights=first.gate_weights, noise=first.noise, noise_std=1.0,
                  eval_noise=first.eval_noise, temperature=first.temperature,
                  importance_weight=max(m.importance_weight for m in models),
                  ls_beta=max(m.ls_beta for m in models), ls_gamma=max(m.ls_gamma for m in models),
                  ls_variant=first.ls_variant, ls_squared=first.ls_squared,
                  capacity_factor=first.capacity_factor, dispatcher=dispatch)
    return ModelStack(models, network, bank.shared + gate.shared, dispatch)


@dataclass
class _Bank:
    bank: ExpertBank
    shared: list[_Shared]


def _bank_of(experts: Sequence[nn.Module], owners: Sequence[nn.Module], singles: bool = False) -> _Bank:
    """One bank holding ``experts`` in order; each owner's tensors become views of their slice
    (owners: the members' banks, or the single models' networks)."""
    bank = _bank_class(experts[0]).from_modules(experts)
    shared = []
    for kind in ("parameters", "buffers"):
        for name, stacked in getattr(bank, f"named_{kind}")():
            path, _, leaf = name.rpartition(".")
            per = stacked.shape[0] // len(owners)
            where = [(o.get_submodule(path) if path else o, leaf, r if singles else slice(r * per, (r + 1) * per))
                     for r, o in enumerate(owners)]
            shared.append(_point_at(stacked, where, kind == "parameters"))
    return _Bank(bank, shared)


def _bank_class(expert: nn.Module) -> type[ExpertBank]:
    for cls in _all_subclasses(ExpertBank):
        if getattr(cls, "expert_class", None) is type(expert):
            return cls
    raise ValueError(f"no expert bank stacks {type(expert).__name__}")


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


class _StackedSingle(nn.Module):
    """R single models as one bank of R experts, member r's network = expert r."""

    def __init__(self, bank: ExpertBank, output_kind: str, num_members: int):
        super().__init__()
        self.bank = bank
        self.output_kind = output_kind
        self.num_members = num_members

    def forward(self, x: torch.Tensor) -> MoEOutput:
        rows = x.shape[0] // self.num_members
        out_RBC, _ = self.bank(x.view(self.num_members, rows, *x.shape[1:]), shared=False)
        out = out_RBC.flatten(0, 1)
        return MoEOutput(output=out.to(torch.promote_types(out.dtype, torch.float32)), output_kind=self.output_kind)
