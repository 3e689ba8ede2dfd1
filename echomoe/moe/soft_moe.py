"""Soft MoE (Puigcerver et al., 2023): experts process learned mixtures of tokens ("slots").

Every slot is a convex combination of *all* tokens of a sample, so the layer is not causal and
belongs in encoders (the vision tower).  It returns :class:`~echomoe.moe.layer.MoEOutput` like
every other FFN in echomoe.

Axis legend: ``B`` batch, ``T`` tokens, ``D`` hidden, ``E`` experts, ``P`` slots per expert,
``S = E * P`` slots.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from echomoe.moe.experts import GroupedExperts
from echomoe.moe.layer import MoEOutput, RoutingInfo, token_regions
from echomoe.moe.routers import refuse_causal


class SoftMoE(nn.Module):
    """Soft mixture of experts.

    Args:
        experts: the expert bank (``E`` experts).
        slots_per_expert: ``P``.
        num_regions: accepted region ids, for statistics only.
        causal: must be ``False``; soft MoE mixes all tokens of a sample into every slot.
    """

    def __init__(
        self,
        *,
        experts: GroupedExperts,
        slots_per_expert: int = 1,
        num_regions: int = 7,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if causal:
            refuse_causal("SoftMoE", "every slot mixes all tokens of a sample, later ones too")
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        self.experts = experts
        self.hidden_size = experts.hidden_size
        self.num_experts = experts.num_experts
        self.slots_per_expert = slots_per_expert
        self.num_regions = num_regions
        # Slot parameters Phi (D, S), initialised like a router.
        self.slot_embeds = nn.Parameter(
            torch.randn(self.hidden_size, self.num_experts * slots_per_expert)
            * self.hidden_size**-0.5
        )

    def forward(
        self,
        hidden_states: Tensor,
        region_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        *,
        aux_losses: bool = True,
        token_types: Tensor | None = None,
    ) -> MoEOutput:
        """``(B, T, D) -> MoEOutput``; region ids (``(B,)``) only feed statistics.

        ``token_mask``, ``aux_losses`` and ``token_types`` are accepted for a uniform call
        signature; soft MoE has no aux losses.
        """
        regions = token_regions(
            "SoftMoE", hidden_states, self.hidden_size, region_ids, self.num_regions
        )
        b = hidden_states.shape[0]
        logits = torch.einsum("btd,ds->bts", hidden_states, self.slot_embeds)
        dispatch = logits.softmax(dim=1)  # over tokens: each slot is a mixture of tokens
        combine = logits.softmax(dim=2)  # over slots: each token a mixture of slot outputs
        slots = torch.einsum("bts,btd->bsd", dispatch, hidden_states)
        per_expert = rearrange(slots, "b (e p) d -> e (b p) d", e=self.num_experts)
        out = self.experts.forward_buckets(per_expert)
        out = rearrange(out, "e (b p) d -> b (e p) d", b=b)
        y = torch.einsum("bts,bsd->btd", combine, out)

        expert_mass = rearrange(combine, "b t (e p) -> (b t) e p", e=self.num_experts).sum(-1)
        weight, top = expert_mass.detach().max(dim=-1, keepdim=True)
        info = RoutingInfo(top, weight, expert_mass.detach(), regions, self.num_experts)
        return MoEOutput(y, {}, info)
