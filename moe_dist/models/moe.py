"""The mixture-of-experts module and the single-model wrapper.

Routing modes (design choice 2):

* ``dense``: the paper's output mixture (docs/papers.md A.1.6). p = softmax(logits / T); every
  expert runs on every sample; y = sum_e p_e y_e.
* ``topk``: conditional computation. Optional noise is added to the gate logits, the k
  largest are chosen and only those experts run, on an index-based dispatch (samples sorted
  by expert into a padded ``[E, cap, ...]`` batch with a mask). The chosen outputs are
  combined with either the softmax over the k chosen logits (renormalised) or the raw noisy
  router value of the chosen expert (Chen et al., docs/papers.md B.2: output = g * f_j*(x)).
* ``attentive``: dense, with p from :class:`ExpertAttention` over the experts' hidden
  states (docs/papers.md A.1.5).
* ``hierarchical``: conditional computation over G groups of M = E / G consecutive experts
  (:func:`hierarchical_route`). A group gate gives p(g), an expert gate p(e|g) inside each
  group; the top_groups most probable groups are chosen, then the top_k most probable
  experts inside each, and only those run, on the same top-k dispatch. A chosen expert's
  weight is p(g) p(e|g) (``gate_weights=probs``) or that product with each level
  renormalised over its chosen ones (``softmax``, the default: a sample's weights sum to 1,
  as flat top-k's softmax over the chosen k). ``gate_probs`` is the flattened distribution
  p(e) = p(g) p(e|g), so L_cv, L_s, H_s, H_u apply to it unchanged; ``group_probs`` is p(g).
  A group is placed on one rank (``placement_unit = M``), so a sample with one chosen group
  travels to one rank.

Where the experts live is the dispatcher's business (``moe_dist.parallel.dispatch``): the
default :class:`~moe_dist.parallel.dispatch.LocalDispatch` runs all E experts on the local
batch; :func:`moe_dist.parallel.parallelize` gives each rank a contiguous block of the
experts (sizes differing by at most one) and an expert-parallel dispatcher (all-to-all), and
the gate losses then cover the global batch.
This module itself makes no ``torch.distributed`` call. The gate is replicated: it scores
all E experts on every rank.

The gate, its probabilities and the auxiliary losses run in float32 even under autocast:
the losses compare small probabilities, and a bf16 softmax over experts changes routing.

Shape legend: B batch; E experts; K experts chosen per sample (top_k; hierarchical:
top_groups * top_k); G groups, M experts per group, J groups chosen per sample; C classes;
H attention hidden size; N rows per expert batch (cap in top-k); S = B*K routed
(sample, slot) pairs; D flattened input features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import check_choice, check_gate_weights, check_hierarchy, check_top_k
from moe_dist.models.experts import ExpertBank
from moe_dist.models.gates import ExpertAttention, HierarchicalGate
from moe_dist.parallel.dispatch import LocalDispatch


@dataclass
class MoEOutput:
    """What a forward pass returns. Gate fields are None for a single model."""

    output: torch.Tensor
    """[B, C] float32 (the gate's dtype): probabilities (image architectures) or logits (patch_cnn)."""
    output_kind: str
    """"probs" | "logits": tells the trainer which loss fits."""
    gate_probs: torch.Tensor | None = None
    """[B, E] float32: softmax of the (noisy) gate logits over all experts; attentive: the
    attention weights."""
    expert_index: torch.Tensor | None = None
    """[B, K] int64: top-k: the chosen experts (best first); hierarchical: the chosen experts of
    the chosen groups, by p(e) (best first); dense/attentive: argmax, K = 1."""
    group_probs: torch.Tensor | None = None
    """[B, G] float32, hierarchical only: the group gate's p(g) (None otherwise)."""
    group_index: torch.Tensor | None = None
    """[B, J] int64, hierarchical only: the chosen groups, most probable first."""
    expert_outputs: torch.Tensor | None = None
    """[E, B, C]: every expert's output (dense/attentive); None in top-k mode."""
    top_expert_output: torch.Tensor | None = None
    """[B, C]: the output of each sample's top-1 expert, unweighted (I(E;Y), A.7). Top-k and
    hierarchical under expert parallelism: None in training (the experts' ranks return only
    the weighted sums; nothing in training reads it), set in eval mode."""
    samples_per_expert: torch.Tensor | None = None
    """[E] int64: top-k: routed (sample, slot) pairs per expert; dense/attentive: argmax counts."""
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weighted regularisers to add to the loss: "importance" (L_cv, A.2.1) and
    "sample_similarity" (L_s, A.2.2), present when their weights are > 0. Under data
    parallelism each is this rank's share: the shares of all ranks sum to the loss of the
    global batch."""
    routing_stats: dict[str, int] = field(default_factory=dict)
    """Top-k and hierarchical, this rank: "routed" (sample, slot) pairs, "dropped" pairs (capacity
    factor), "expert_rows" real rows and "padded_rows" rows with padding of the expert batch
    (see ``moe_dist.parallel.dispatch``)."""


def _float32(device: torch.device):
    """A region where autocast is off, so the gate and its losses stay float32."""
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class HierarchicalRoute:
    """What :func:`hierarchical_route` decides for a batch."""

    probs_BE: torch.Tensor
    """p(e) = p(g(e)) p(e | g(e)), the flattened distribution (rows sum to 1)."""
    group_probs_BG: torch.Tensor
    """p(g)."""
    group_index_BJ: torch.Tensor
    """The chosen groups, most probable first."""
    index_BK: torch.Tensor
    """The chosen experts (global ids), K = J * top_k, ordered by p(e), best first."""
    weights_BK: torch.Tensor
    """Each chosen expert's weight in the output (see ``gate_weights``)."""


def hierarchical_route(group_logits_BG: torch.Tensor, expert_logits_BE: torch.Tensor, top_groups: int,
                       top_k: int, gate_weights: str = "softmax", temperature: float = 1.0) -> HierarchicalRoute:
    """Two-level routing (module docstring): the top_groups groups by p(g), the top_k experts
    by p(e|g) inside each, weighted p(g) p(e|g) (``probs``) or with both levels renormalised
    over the chosen (``softmax``). Expert e belongs to group e // M."""
    B, G = group_logits_BG.shape
    M = expert_logits_BE.shape[1] // G
    group_probs_BG = F.softmax(group_logits_BG / temperature, dim=-1)
    within_BGM = F.softmax(expert_logits_BE.view(B, G, M) / temperature, dim=-1)
    probs_BE = (group_probs_BG.unsqueeze(-1) * within_BGM).reshape(B, G * M)
    group_w_BJ, group_BJ = group_probs_BG.topk(top_groups, dim=-1)
    chosen_BJM = within_BGM.gather(1, group_BJ.unsqueeze(-1).expand(B, top_groups, M))
    expert_w_BJk, local_BJk = chosen_BJM.topk(top_k, dim=-1)
    if gate_weights == "softmax":  # each level over its chosen ones: a sample's weights sum to 1
        group_w_BJ = group_w_BJ / group_w_BJ.sum(-1, keepdim=True)
        expert_w_BJk = expert_w_BJk / expert_w_BJk.sum(-1, keepdim=True)
    index_BK = (group_BJ.unsqueeze(-1) * M + local_BJk).reshape(B, -1)
    weights_BK = (group_w_BJ.unsqueeze(-1) * expert_w_BJk).reshape(B, -1)
    # best first by p(e), so slot 0 is the sample's top expert (I(E;Y), capacity priority)
    order_BK = probs_BE.detach().gather(1, index_BK).argsort(dim=-1, descending=True, stable=True)
    return HierarchicalRoute(probs_BE, group_probs_BG, group_BJ, index_BK.gather(1, order_BK),
                             weights_BK.gather(1, order_BK))


class MoE(nn.Module):
    """Experts (an :class:`ExpertBank`), a gate and a routing mode; see the module docstring.

    ``experts`` and ``gate`` are public (``model.experts``, ``model.gate``);
    ``expert_parameters()`` and ``gate_parameters()`` split the parameters for optimizer
    groups, freezing and NormalizedGD (every expert tensor has the expert dim first). The
    attention's W_q and W_k count as gate parameters (A.1.5).
    """

    def __init__(self, experts: ExpertBank, gate: nn.Module, *, routing: str = "dense",
                 output_kind: str = "probs", attention: ExpertAttention | None = None,
                 top_k: int = 1, gate_weights: str = "softmax", noise: str = "none",
                 noise_std: float = 1.0, eval_noise: bool = False, temperature: float = 1.0,
                 importance_weight: float = 0.0, ls_beta: float = 0.0, ls_gamma: float = 0.0,
                 ls_variant: str = "normalized", ls_squared: bool = False,
                 capacity_factor: float = 0.0, num_groups: int = 1, top_groups: int = 1,
                 dispatcher: LocalDispatch | None = None):
        super().__init__()
        # The config's rules (moe_dist.config), for modules built without a config.
        for key, value in (("moe.routing", routing), ("moe.gate_weights", gate_weights), ("moe.noise", noise)):
            check_choice(key, value)
        check_top_k(top_k, experts.num_experts)
        check_hierarchy(routing, experts.num_experts, num_groups, top_groups, top_k)
        check_gate_weights(gate_weights, routing)
        if (routing == "hierarchical") != (isinstance(gate, HierarchicalGate) and gate.num_groups == num_groups):
            raise ValueError("routing='hierarchical' needs a HierarchicalGate of num_groups groups, "
                             "and only it uses one")
        if output_kind not in ("probs", "logits"):
            raise ValueError(f"output_kind={output_kind!r} is not one of: probs, logits")
        if (routing == "attentive") != (attention is not None):
            raise ValueError("routing='attentive' needs an ExpertAttention, and only it uses one")
        self.experts = experts
        self.gate = gate
        self.attention = attention
        self.num_experts = experts.num_experts
        self.routing = routing
        self.output_kind = output_kind
        self.top_k = top_k
        self.gate_weights = gate_weights
        self.noise = noise
        self.noise_std = noise_std
        self.eval_noise = eval_noise
        self.temperature = temperature
        self.importance_weight = importance_weight
        self.ls_beta = ls_beta
        self.ls_gamma = ls_gamma
        self.ls_variant = ls_variant
        self.ls_squared = ls_squared
        if capacity_factor < 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be >= 0 (0: dropless)")
        self.capacity_factor = capacity_factor
        self.num_groups = num_groups
        self.top_groups = top_groups
        if routing == "hierarchical":
            # a group's experts share a rank under expert parallelism (moe_dist.parallel.model)
            self.placement_unit = experts.num_experts // num_groups
        # Not a submodule: no parameters, no state-dict entries.
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatch()

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def gate_parameters(self) -> list[nn.Parameter]:
        params = list(self.gate.parameters())
        if self.attention is not None:
            params += list(self.attention.parameters())
        return params

    def forward(self, x: torch.Tensor) -> MoEOutput:
        layout = self.dispatcher.layout(x.shape[0])
        gate_dtype = next(self.gate.parameters()).dtype  # float32 unless the model was cast
        with _float32(x.device):
            gate_out = self.gate(x.to(gate_dtype))  # logits [B, E], or g(x) [B, H] if attentive
        if self.routing == "topk":
            out = self._forward_topk(x, gate_out, layout)
        elif self.routing == "hierarchical":
            out = self._forward_hierarchical(x, gate_out, layout)
        else:
            out = self._forward_dense(x, gate_out, layout)
        out.aux_losses = self._aux_losses(x, out.gate_probs, layout)
        return out

    def _forward_dense(self, x: torch.Tensor, gate_out: torch.Tensor, layout) -> MoEOutput:
        out_EBC, hidden_EBH = self.dispatcher.dense(self.experts, x, layout,
                                                    need_hidden=self.routing == "attentive")
        with _float32(x.device):
            if self.routing == "attentive":
                probs_BE = self.attention(gate_out, hidden_EBH.to(gate_out.dtype))
            else:
                probs_BE = F.softmax(gate_out / self.temperature, dim=-1)
            output_BC = torch.einsum("be,ebc->bc", probs_BE, out_EBC.to(probs_BE.dtype))
        top_B = probs_BE.argmax(dim=-1)
        return MoEOutput(
            output=output_BC, output_kind=self.output_kind, gate_probs=probs_BE,
            expert_index=top_B.unsqueeze(1), expert_outputs=out_EBC,
            top_expert_output=out_EBC[top_B, torch.arange(x.shape[0], device=x.device)],
            samples_per_expert=torch.bincount(top_B, minlength=self.num_experts))

    def _noisy(self, logits_BF: torch.Tensor, layout) -> torch.Tensor:
        """The logits with routing noise added while training (or with eval_noise)."""
        if self.noise == "none" or not (self.training or self.eval_noise):
            return logits_BF
        # the dispatcher draws the global batch's noise and returns this rank's rows
        noise_BF = self.dispatcher.noise(self.noise, logits_BF, layout)
        if self.noise == "gaussian":
            return logits_BF + self.noise_std * noise_BF
        return logits_BF + noise_BF  # Chen et al.: r ~ U[0, 1) per sample and expert (B.2)

    def _forward_topk(self, x: torch.Tensor, logits_BE: torch.Tensor, layout) -> MoEOutput:
        with _float32(x.device):
            logits_BE = self._noisy(logits_BE, layout)
            probs_BE = F.softmax(logits_BE / self.temperature, dim=-1)
            chosen_BK, index_BK = logits_BE.topk(self.top_k, dim=-1)
            if self.gate_weights == "softmax":
                weights_BK = F.softmax(chosen_BK / self.temperature, dim=-1)
            elif self.gate_weights == "probs":  # Switch Transformer: p(e), not renormalised
                weights_BK = probs_BE.gather(1, index_BK)
            else:
                weights_BK = chosen_BK
        # index-based dispatch, summed where the experts are (see LocalDispatch.topk); outside
        # _float32 so that the experts run under autocast, the sum being in the weights' float32
        output_BC, top_BC, counts_E, stats = self.dispatcher.topk(
            self.experts, x, index_BK, self.num_experts, self.capacity_factor, weights_BK=weights_BK,
            need_top=not self.training)
        return MoEOutput(
            output=output_BC, output_kind=self.output_kind, gate_probs=probs_BE,
            expert_index=index_BK, top_expert_output=top_BC, samples_per_expert=counts_E,
            routing_stats=stats)

    def _forward_hierarchical(self, x: torch.Tensor, gate_out: tuple[torch.Tensor, torch.Tensor],
                              layout) -> MoEOutput:
        group_BG, expert_BE = gate_out
        G = group_BG.shape[1]
        with _float32(x.device):
            # one draw for both levels: the global batch's noise, as flat top-k draws it
            logits_BF = self._noisy(torch.cat([group_BG, expert_BE], 1), layout)
            route = hierarchical_route(logits_BF[:, :G], logits_BF[:, G:], self.top_groups, self.top_k,
                                       self.gate_weights, self.temperature)
        # the chosen flat expert ids go through the top-k dispatch: expert parallelism unchanged
        output_BC, top_BC, counts_E, stats = self.dispatcher.topk(
            self.experts, x, route.index_BK, self.num_experts, self.capacity_factor,
            weights_BK=route.weights_BK, need_top=not self.training)
        return MoEOutput(
            output=output_BC, output_kind=self.output_kind, gate_probs=route.probs_BE,
            expert_index=route.index_BK, group_probs=route.group_probs_BG, group_index=route.group_index_BJ,
            top_expert_output=top_BC, samples_per_expert=counts_E, routing_stats=stats)

    def _aux_losses(self, x: torch.Tensor, probs_BE: torch.Tensor, layout) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        with _float32(x.device):
            if self.importance_weight > 0:
                losses["importance"] = self.dispatcher.importance_loss(probs_BE, self.importance_weight)
            if self.ls_beta > 0 or self.ls_gamma > 0:
                losses["sample_similarity"] = self.dispatcher.sample_similarity_loss(
                    x.flatten(1).to(probs_BE.dtype), probs_BE, layout, self.ls_beta,
                    self.ls_gamma, self.ls_variant, self.ls_squared)
        return losses


class SingleModel(nn.Module):
    """One expert-shaped network, the papers' single-model baseline (model.kind=single).

    Returns a :class:`MoEOutput` with only ``output`` and ``output_kind`` set, so the
    trainer treats both kinds alike. All parameters are expert parameters.
    """

    def __init__(self, expert: nn.Module, output_kind: str = "probs"):
        super().__init__()
        self.expert = expert
        self.output_kind = output_kind

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def gate_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, x: torch.Tensor) -> MoEOutput:
        out_BC, _ = self.expert(x)
        output_BC = out_BC.to(torch.promote_types(out_BC.dtype, torch.float32))  # autocast: bf16
        return MoEOutput(output=output_BC, output_kind=self.output_kind)
