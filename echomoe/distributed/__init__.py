"""Scale-out primitives: ``torchrun`` process groups, all-to-all, expert parallelism, sharded
batches, ZeRO-3 support and consolidated checkpoints.

=========================== ================================================================
:mod:`.runtime`             :func:`init_distributed` from the ``torchrun`` environment
:mod:`.all_to_all`          differentiable all-to-all with uneven splits
:mod:`.expert_parallel`     :func:`shard_experts`: each rank keeps ``E / P`` experts
:mod:`.data`                :class:`ShardedBatches`: each rank reads its shard of a batch
:mod:`.zero`                ZeRO-3 gathering of echomoe's MoE parameters
:mod:`.checkpoint`          :func:`save_pretrained_consolidated`: one ordinary checkpoint
=========================== ================================================================

Nothing here imports :mod:`echomoe.train`.  The training strategies built on these pieces
(local, DDP, DeepSpeed) are in :mod:`echomoe.train.strategy` and :mod:`echomoe.train.deepspeed`;
:func:`echomoe.train.train` picks one from the environment (``torchrun``) and its
``deepspeed=`` / ``ep_size=`` arguments.
"""

from echomoe.distributed.all_to_all import all_to_all
from echomoe.distributed.checkpoint import full_state_dict, save_pretrained_consolidated
from echomoe.distributed.data import ShardedBatches
from echomoe.distributed.expert_parallel import (
    ExpertParallelExperts,
    ExpertParallelGroups,
    check_expert_split,
    expert_parallel_groups,
    gather_expert_state,
    shard_experts,
)
from echomoe.distributed.runtime import (
    WorldInfo,
    all_reduce_mean,
    barrier,
    free_port,
    init_distributed,
    is_distributed,
    world_info,
)

__all__ = [
    "ExpertParallelExperts",
    "ExpertParallelGroups",
    "ShardedBatches",
    "WorldInfo",
    "all_reduce_mean",
    "all_to_all",
    "barrier",
    "check_expert_split",
    "expert_parallel_groups",
    "free_port",
    "full_state_dict",
    "gather_expert_state",
    "init_distributed",
    "is_distributed",
    "save_pretrained_consolidated",
    "shard_experts",
    "world_info",
]
