"""Process-group set-up from the ``torchrun`` environment, and small collective helpers.

::

    from echomoe.distributed import init_distributed, world_info
    info = init_distributed()          # reads RANK / WORLD_SIZE / MASTER_ADDR ... (torchrun)
    info.rank, info.world_size, info.device

``torchrun --nproc_per_node N script.py`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``.  :func:`init_distributed` creates the default process group
from them: ``nccl`` when CUDA is available, ``gloo`` otherwise (CPU, loopback).  A plain
``python script.py`` (no ``WORLD_SIZE``) is a world of one: nothing is initialised unless
``force=True`` (DeepSpeed needs a process group even for one process).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its host and the
    ``device`` it should use (``cuda:<local_rank>`` on GPUs, else ``cpu``)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 (writes logs, checkpoints, summaries)."""
        return self.rank == 0


def is_distributed() -> bool:
    """``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> WorldInfo:
    """The :class:`WorldInfo` of this process (a world of one when nothing is initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = (torch.device("cuda", local_rank) if torch.cuda.is_available()
              else torch.device("cpu"))
    return WorldInfo(rank, world, local_rank, device)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for ``MASTER_PORT`` of a local run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(*, backend: str | None = None, force: bool = False,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> WorldInfo:
    """Initialise the default process group from the ``torchrun`` environment.

    Args:
        backend: ``"gloo"`` / ``"nccl"``; ``None`` picks ``nccl`` with CUDA, ``gloo`` without.
        force: also initialise a world of one when no ``WORLD_SIZE`` is set (sets
            ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``).
        timeout_s: collective timeout.

    Returns this process's :class:`WorldInfo`.  Calling it again is a no-op.

    Raises:
        RuntimeError: ``WORLD_SIZE`` is set but ``RANK`` or ``MASTER_ADDR`` is not.
    """
    if dist.is_initialized():
        return world_info()
    if "WORLD_SIZE" not in os.environ:
        if not force:
            return world_info()
        os.environ.update({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with "
            "`torchrun --nproc_per_node N ...` (or set RANK, MASTER_ADDR and MASTER_PORT)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return world_info()


def all_reduce_mean(values: dict[str, float], group=None) -> dict[str, float]:
    """Average a dict of floats over the ranks of ``group`` (identity in a world of one).

    Every rank must pass the same keys in the same order.
    """
    if not is_distributed() or not values:
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    t /= dist.get_world_size(group)
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (identity in a world of one)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if is_distributed():
        dist.barrier()
