"""Expert parallelism: each rank keeps ``E / P`` of a layer's experts and tokens travel to the
rank that owns their expert with an all-to-all (and back).

::

    from echomoe.distributed import init_distributed, shard_experts
    init_distributed()                                  # torchrun, P = world size
    model = EchoMoEForConditionalGeneration.from_pretrained("ckpt")   # full checkpoint
    shard_experts(model)                                # rank r keeps experts r*E/P ... (r+1)*E/P-1

:func:`shard_experts` replaces each :class:`~echomoe.moe.experts.GroupedExperts` of the model's
token-choice :class:`~echomoe.moe.layer.MoELayer` s by an :class:`ExpertParallelExperts` that
holds *this rank's* slice of the full weights, so a full checkpoint loads on any number of ranks
(rank ``r`` takes experts ``[r * E/P, (r + 1) * E/P)``, not the first ones).  Layers built with
``backend="expert_parallel"`` are the ones sharded by default (training under ``torchrun`` does
it for you, see :func:`echomoe.train.train`); pass ``only_marked=False`` to shard every layer.

**Forward** (per layer; ``N`` tokens, ``k`` slots, ``S`` kept assignments, ``P`` ranks,
``E_l = E / P`` local experts):

1. sort the ``S`` (token, expert) assignments by expert; expert ``e`` lives on rank
   ``e // E_l``, so the sorted rows are already grouped by destination rank;
2. exchange the per-expert counts (``(P, E_l)`` integers), then the rows and their combine
   weights (:func:`~echomoe.distributed.all_to_all.all_to_all`, uneven splits);
3. run the received rows through the local experts with grouped GEMMs;
4. send the results back and sum each token's ``k`` weighted rows (``index_add``).

**Gradients.**  The backward of the all-to-all brings every rank's contribution to the rank that
owns the expert, so an expert's local gradient already sums over the whole expert-parallel
group: expert gradients must *not* be averaged over that group again (and not multiplied by
``P``).  The training strategies divide expert gradients by the data-parallel world size, like
every other gradient, and all-reduce them only across ranks that hold the same experts
(:attr:`ExpertParallelGroups.expert_dp_group`).

Token-choice routers only (``topk``, ``region_hard``, ``region_soft``): expert choice and soft
MoE route per expert and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from echomoe.distributed.all_to_all import all_to_all, exchange_counts
from echomoe.moe.dispatch import grouped_experts_forward
from echomoe.moe.experts import GroupedExperts

EXPERT_PARALLEL_BACKEND = "expert_parallel"


@dataclass(frozen=True)
class ExpertParallelGroups:
    """Process groups of expert parallelism with ``ep_size`` ranks per group.

    Ranks ``[g * P, (g + 1) * P)`` form expert-parallel group ``g`` (they split the experts
    between them); ranks with the same ``rank % P`` hold the same experts and form an
    expert-data-parallel group (``expert_dp_size = world / P`` ranks).
    """

    ep_size: int
    ep_rank: int
    ep_group: object | None
    expert_dp_size: int
    expert_dp_group: object | None


_GROUPS: dict[int, ExpertParallelGroups] = {}


def check_expert_split(num_experts: int, ep_size: int, world_size: int) -> None:
    """Raise a ``ValueError`` unless ``ep_size`` divides both ``num_experts`` and
    ``world_size``."""
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide the world size {world_size}")
    if num_experts % ep_size:
        valid = [d for d in range(1, num_experts + 1)
                 if num_experts % d == 0 and world_size % d == 0]
        raise ValueError(
            f"expert parallelism over {ep_size} ranks cannot split {num_experts} experts evenly "
            f"(world size {world_size}): each rank must hold the same number of experts. Use a "
            f"number of processes / ep_size that divides {num_experts} "
            f"(possible ep_size here: {valid}), or change moe_config.num_experts.")


def expert_parallel_groups(ep_size: int | None = None) -> ExpertParallelGroups:
    """The :class:`ExpertParallelGroups` for ``ep_size`` (default: the world size), created
    once per size.  Every rank must call it (group creation is collective)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    ep_size = world if ep_size is None else int(ep_size)
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide the world size {world}")
    if ep_size in _GROUPS:
        return _GROUPS[ep_size]
    ep_group = dp_group = None
    if world > 1:
        # Separate groups (also when P == world): the token exchange must not interleave with
        # the data-parallel gradient all-reduce on the default group.
        for g in range(world // ep_size):
            ranks = list(range(g * ep_size, (g + 1) * ep_size))
            made = dist.new_group(ranks)
            if rank in ranks:
                ep_group = made
        for i in range(ep_size):
            ranks = list(range(i, world, ep_size))
            made = dist.new_group(ranks)
            if rank in ranks:
                dp_group = made
    groups = ExpertParallelGroups(ep_size, rank % ep_size, ep_group, world // ep_size, dp_group)
    _GROUPS[ep_size] = groups
    return groups


class ExpertParallelExperts(GroupedExperts):
    """The local ``E / P`` experts of a layer with ``E`` experts split over ``P`` ranks.

    Same interface as :class:`~echomoe.moe.experts.GroupedExperts` (``num_experts`` is the
    global ``E``; ``expert_ids`` are global ids); its parameters hold the local experts only:
    ``gate_up_proj [E/P, 2F, D]``, ``down_proj [E/P, D, F]``.  Build it with :meth:`from_full`.

    Args:
        num_experts: ``E`` (all ranks together).
        hidden_size, intermediate_size, activation, bias: as for ``GroupedExperts``.
        groups: the :class:`ExpertParallelGroups` (``ep_size = P``, this rank's ``ep_rank``).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 groups: ExpertParallelGroups, activation: str = "swiglu",
                 bias: bool = False) -> None:
        world = groups.ep_size * groups.expert_dp_size
        check_expert_split(num_experts, groups.ep_size, world)
        local = num_experts // groups.ep_size
        with torch.random.fork_rng(devices=[]):  # parameters are overwritten by from_full
            super().__init__(local, hidden_size, intermediate_size, activation=activation,
                             backend="grouped_mm", bias=bias)
        self.num_experts = num_experts
        self.num_local_experts = local
        self.first_expert = groups.ep_rank * local
        self.groups = groups
        self.backend = EXPERT_PARALLEL_BACKEND

    @classmethod
    def from_full(cls, experts: GroupedExperts,
                  groups: ExpertParallelGroups) -> ExpertParallelExperts:
        """Keep this rank's slice ``[ep_rank * E/P, (ep_rank + 1) * E/P)`` of ``experts``."""
        if isinstance(experts, ExpertParallelExperts):
            raise ValueError("these experts are already sharded")
        new = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size,
                  groups=groups, activation=experts.activation, bias=experts.in_bias is not None)
        own = slice(new.first_expert, new.first_expert + new.num_local_experts)
        with torch.no_grad():
            for name, param in new.named_parameters():
                full = getattr(experts, name)
                param.data = full.detach()[own].clone().to(full.device)
                param.requires_grad_(full.requires_grad)
        return new

    @property
    def expert_range(self) -> range:
        """Global ids of the local experts."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def forward(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """Combine each token's experts across ranks.

        Args:
            x: ``(N, D)``; expert_ids: ``(N, k)`` global ids, ``-1`` = dropped; weights:
                ``(N, k)``.

        Returns ``(N, D)`` (as :meth:`GroupedExperts.forward` with all ``E`` experts local).
        Collective: every rank of the expert-parallel group must call it.
        """
        # Legend: N tokens, k slots, S kept assignments, P ranks, L local experts, R received.
        p, local = self.groups.ep_size, self.num_local_experts
        if p == 1:
            return super().forward(x, expert_ids, weights)
        group = self.groups.ep_group
        n, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        kept = (flat >= 0).nonzero().squeeze(-1)
        order = kept[torch.argsort(flat[kept], stable=True)]  # (S,) slots sorted by expert
        expert = flat[order]
        token = order // k
        counts = torch.bincount(expert, minlength=self.num_experts).view(p, local)
        received = exchange_counts(counts, group)  # (P, L): rows from rank s for expert l
        send = counts.sum(1).tolist()
        recv = received.sum(1).tolist()
        rows = torch.cat([x.index_select(0, token),
                          weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(x.dtype)],
                         dim=-1)  # (S, D + 1): the row and its combine weight travel together
        got = all_to_all(rows, recv, send, group)  # (R, D + 1), grouped by source rank
        local_ids = torch.arange(local, device=x.device).repeat(p).repeat_interleave(
            received.reshape(-1))  # (R,) local expert of each received row
        y = grouped_experts_forward(
            got[:, :-1], local_ids.unsqueeze(-1), got[:, -1:], self.w_in, self.down_proj,
            self.in_bias, self.down_bias, self.activation)  # (R, D), weighted
        back = all_to_all(y, send, recv, group)  # (S, D), in ``order``
        return x.new_zeros(n, x.shape[-1]).index_add(0, token, back.to(x.dtype))

    def forward_buckets(self, x: Tensor) -> Tensor:
        raise NotImplementedError("expert parallelism supports token-choice routers only")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, local_experts={self.first_expert}.."
                f"{self.first_expert + self.num_local_experts - 1}, "
                f"ep_size={self.groups.ep_size}")


def expert_parallel_layers(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """``{qualified name: module}`` of the sharded expert banks of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def expert_parallel_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{qualified name: parameter}`` of the sharded (rank-local) expert parameters."""
    out = {}
    for prefix, module in expert_parallel_layers(model).items():
        for name, param in module.named_parameters():
            out[f"{prefix}.{name}"] = param
    return out


def _shardable(model: nn.Module, only_marked: bool) -> list[tuple[nn.Module, str]]:
    from echomoe.moe.layer import MoELayer
    from echomoe.moe.routers import ExpertChoiceRouter

    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, GroupedExperts) or isinstance(experts, ExpertParallelExperts):
            continue
        if only_marked and experts.backend != EXPERT_PARALLEL_BACKEND:
            continue
        if not isinstance(module, MoELayer) or isinstance(module.router, ExpertChoiceRouter):
            raise ValueError(f"{name}: expert parallelism needs a token-choice MoELayer "
                             f"(topk / region routers), got {type(module).__name__}")
        found.append((module, name))
    return found


def has_expert_parallel_backend(model: nn.Module) -> bool:
    """Whether any expert bank of ``model`` was built with ``backend="expert_parallel"``."""
    return any(isinstance(m, GroupedExperts) and m.backend == EXPERT_PARALLEL_BACKEND
               for m in model.modules())


def shard_experts(model: nn.Module, ep_size: int | None = None, *,
                  only_marked: bool = True) -> list[str]:
    """Keep only this rank's experts in every eligible MoE layer of ``model`` (in place).

    Args:
        model: a model whose expert banks hold *all* experts (e.g. just built with the same
            seed on every rank, or loaded from a full checkpoint).
        ep_size: ranks per expert-parallel group (default: the world size).
        only_marked: shard only banks built with ``backend="expert_parallel"``.

    Returns the names of the sharded MoE layers.  Collective (creates process groups).

    Raises:
        ValueError: ``ep_size`` does not divide the number of experts or the world size.
    """
    layers = _shardable(model, only_marked)
    world = dist.get_world_size() if dist.is_initialized() else 1
    size = world if ep_size is None else int(ep_size)
    for module, name in layers:
        try:
            check_expert_split(module.experts.num_experts, size, world)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    groups = expert_parallel_groups(size)
    for module, _ in layers:
        module.experts = ExpertParallelExperts.from_full(module.experts, groups)
    return [name for _, name in layers]


def gather_expert_state(model: nn.Module) -> dict[str, Tensor]:
    """Full ``[E, ...]`` tensors of every sharded expert parameter (names as in
    ``model.state_dict()``), all-gathered over each expert-parallel group.  Collective."""
    out = {}
    for name, param in expert_parallel_params(model).items():
        owner = _owner(model, name)
        group = owner.groups.ep_group
        parts = [torch.empty_like(param) for _ in range(owner.groups.ep_size)]
        dist.all_gather(parts, param.detach().contiguous(), group=group)
        out[name] = torch.cat(parts, dim=0)
    return out


def _owner(model: nn.Module, param_name: str) -> ExpertParallelExperts:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def local_expert_slice(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` (full experts) with every sharded expert tensor cut to this rank's
    experts, ready for ``model.load_state_dict``."""
    out = dict(state_dict)
    for name in expert_parallel_params(model):
        owner = _owner(model, name)
        r = owner.expert_range
        out[name] = state_dict[name][r.start:r.stop]
    return out
