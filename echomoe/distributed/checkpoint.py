"""Consolidated weights under expert parallelism and ZeRO: one full, ordinary checkpoint.

::

    from echomoe.distributed import save_pretrained_consolidated
    save_pretrained_consolidated(model, "out/model", engine=engine)   # every rank calls it
    EchoMoEForConditionalGeneration.from_pretrained("out/model")      # anywhere, one process

* **Expert parallelism**: the rank-local expert slices ``[E/P, ...]`` are all-gathered into the
  full ``[E, ...]`` tensors (:func:`~echomoe.distributed.expert_parallel.gather_expert_state`).
* **ZeRO-3**: partitioned parameters are gathered module by module onto rank 0
  (``deepspeed.zero.GatheredParameters``; the weights keep their training dtype).
* **ZeRO-1/2**: parameters are not partitioned; the module's state is complete on every rank.

The result is written by rank 0 only and is exactly what a single-process
``model.save_pretrained`` writes, so it loads with ``from_pretrained`` on any number of ranks
(:func:`~echomoe.distributed.expert_parallel.shard_experts` then keeps each rank's experts).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from echomoe.distributed.expert_parallel import (
    expert_parallel_layers,
    gather_expert_state,
    local_expert_slice,
)
from echomoe.distributed.runtime import barrier, world_info


def _is_zero3(model: nn.Module, engine) -> bool:
    if engine is not None:
        return bool(engine.zero_optimization_partition_weights())
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gather_zero3(model: nn.Module) -> dict[str, Tensor] | None:
    """Gather ZeRO-3 partitioned parameters module by module onto rank 0 (CPU copies)."""
    import deepspeed

    main = world_info().is_main
    state: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if main:
                for name, tensor in [*module.named_parameters(recurse=False),
                                     *module.named_buffers(recurse=False)]:
                    if name in module._non_persistent_buffers_set:
                        continue
                    state[f"{prefix}.{name}" if prefix else name] = tensor.detach().cpu().clone()
    return state if main else None


def full_state_dict(model: nn.Module, engine=None) -> dict[str, Tensor] | None:
    """The full (consolidated) ``state_dict`` of ``model`` on rank 0, ``None`` on other ranks.

    Args:
        model: the plain module (``engine.module`` under DeepSpeed; not a DDP wrapper).
        engine: the DeepSpeed engine (optional: ZeRO-3 partitioned parameters are recognised
            on the model itself).

    Collective: every rank must call it.
    """
    if _is_zero3(model, engine):
        if expert_parallel_layers(model):
            raise ValueError("expert parallelism with ZeRO-3 is not supported")
        return _gather_zero3(model)
    experts = gather_expert_state(model) if expert_parallel_layers(model) else {}
    if not world_info().is_main:
        return None
    state = model.state_dict()
    state.update(experts)
    return state


def save_pretrained_consolidated(model: nn.Module, save_directory: str | os.PathLike,
                                 engine=None, **kwargs) -> Path:
    """``model.save_pretrained(save_directory)`` with consolidated weights (rank 0 writes).

    ``kwargs`` go to ``save_pretrained``.  Collective: every rank must call it; returns the
    directory once rank 0 has written it.
    """
    state = full_state_dict(model, engine)
    if world_info().is_main:
        model.save_pretrained(save_directory, state_dict=state, **kwargs)
    barrier()
    return Path(save_directory)


def write_safetensors(state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Write a state dict with ``safetensors``.  Tied tensors (the same data, shape and
    strides under several names, e.g. tied embeddings) are written once under their first
    name; every tensor is copied out of its storage first (ZeRO keeps parameters as views of
    flat buffers, which ``safetensors`` refuses to save)."""
    from safetensors.torch import save_file

    kept: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.detach().cpu().clone().contiguous()
    save_file(kept, str(path), metadata={"format": "pt"})


def load_consolidated(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a full ``model.safetensors`` into ``model``; sharded expert banks take their own
    slice.  Keys missing from the file must share storage with a loaded one (tied weights)."""
    from safetensors.torch import load_file

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = local_expert_slice(model, load_file(str(path), device=str(device)))
    own = model.state_dict()
    missing = set(own) - set(state)
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    untied = sorted(k for k in missing if own[k].data_ptr() not in loaded_ptrs)
    unexpected = sorted(set(state) - set(own))
    if untied or unexpected:
        raise RuntimeError(f"{path}: missing keys {untied}, unexpected keys {unexpected}")
    model.load_state_dict(state, strict=False)
