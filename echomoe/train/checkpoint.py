"""Training checkpoints: model + optimiser + scheduler + RNG + data position, written atomically.

A checkpoint is a directory::

    step_00000040/
        model.safetensors     model.state_dict() (safetensors: no pickle)
        training_state.pt     {"optimizer", "scheduler", "rng"} (torch.save)
        meta.json             {"format", "step", "data_state", "extra"} (JSON)

**Atomicity.**  Everything is written into a hidden sibling ``.step_00000040.tmp-<pid>-<hex>``,
flushed to disk, then renamed onto the final name with :func:`os.replace`.  A crash mid-save
leaves only a hidden temporary directory (ignored by :func:`latest_checkpoint` and removed by
:func:`remove_stale_tmp`); earlier checkpoints are untouched.  Re-saving an existing name (e.g.
``best``) moves the old directory aside first, so there is no moment without a complete copy on
disk (at worst under its ``.old`` name).

**Several processes** (``torchrun`` / DeepSpeed, see :mod:`echomoe.distributed`): the same
directory, written collectively.  Rank 0 writes ``model.safetensors`` with the *consolidated*
weights (expert-parallel shards gathered, ZeRO-3 partitions gathered: it loads into a
single-process model) and ``meta.json`` (plus ``world_size`` and ``strategy``); rank ``r``
writes its own optimiser / scheduler / RNG state as ``training_state.pt`` (rank 0) or
``training_state_rank<r>.pt``; under DeepSpeed the optimiser state is DeepSpeed's own sharded
checkpoint in ``deepspeed/``.  Resuming needs the same number of processes.

**Integrity.**  A checkpoint is verified before it is renamed into place
(:func:`verify_checkpoint`: ``meta.json`` parses, ``model.safetensors``'s header and data
length agree, every ``training_state*.pt`` loads), so a bad write never becomes the latest.
On resume, :func:`latest_valid_checkpoint` skips a damaged latest checkpoint (a truncated or
garbled file, written by something else or damaged on disk) with a warning naming the file, and
resumes from the newest intact one.

**Pickle.**  ``training_state.pt`` is loaded with ``torch.load(weights_only=True)``: optimiser
and :func:`~echomoe.train.optim.warmup_cosine_scheduler` states hold only tensors, numbers,
strings, lists, tuples and dicts, and the RNG states are stored in that form too (the numpy key
as a tensor).  Nothing in an echomoe checkpoint needs ``weights_only=False``.  A scheduler or
optimiser whose state holds other Python objects fails to load with an error that says so; pass
``trust_pickle=True`` only for a checkpoint you wrote yourself (it then unpickles with a
warning).  ``data_state`` and ``extra`` must be JSON-serialisable.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_FORMAT = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that does not read back; the message names the file."""


def step_dirname(step: int) -> str:
    """``step_00000040`` for step 40 (zero-padded so names sort by step)."""
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (+ CUDA when available) RNG states, in a ``weights_only``-safe
    form."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- save
def swap_in_dir(tmp: Path, path: Path, token: str) -> None:
    """Atomically put the finished directory ``tmp`` at ``path``: an existing ``path`` is moved
    aside first (``.<name>.old-<token>``) and removed only after the rename, so a crash leaves
    either the old or the new checkpoint, never a half-written one."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{token}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, model: nn.Module, optimizer, scheduler, step: int,
                 data_state: dict | None, extra: dict | None) -> None:
    """Write the three checkpoint files into ``tmp`` (split out so tests can break it)."""
    from safetensors.torch import save_model

    save_model(model, str(tmp / MODEL_FILE))
    torch.save({
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
    }, tmp / STATE_FILE)
    meta = {"format": CHECKPOINT_FORMAT, "step": int(step), "data_state": data_state or {},
            "extra": extra or {}}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    step: int,
    data_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring).

    Args:
        path: final directory (e.g. ``run/checkpoints/step_00000040``); its parent is created.
        model: saved with ``safetensors.torch.save_model`` (shared tensors handled).
        optimizer, scheduler: anything with ``state_dict()`` (or ``None``).
        step: optimiser steps taken.
        data_state: JSON-serialisable data position (e.g. ``{"epoch": 0, "index": 12}``).
        extra: JSON-serialisable extras (best metric, stage, ...).

    Returns the final path.
    """
    path = Path(path)
    json.dumps({"data_state": data_state, "extra": extra})  # fail before writing anything
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{token}"
    tmp.mkdir()
    try:
        _write_files(tmp, model, optimizer, scheduler, step, data_state, extra)
        verify_checkpoint(tmp)
        swap_in_dir(tmp, path, token)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------- load
def load_training_state(file: str | os.PathLike, map_location: str | torch.device = "cpu",
                        trust_pickle: bool = False) -> dict:
    """A ``training_state*.pt`` file, read with ``torch.load(weights_only=True)``; with
    ``trust_pickle`` a file that needs unpickling is read anyway (with a warning; only for your
    own checkpoints).  Otherwise such a file is an ``UnpicklingError`` that says so."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise pickle.UnpicklingError(
                f"{file} holds Python objects that torch.load(weights_only=True) refuses "
                f"({err}). echomoe's own optimiser/scheduler states never need this; if the "
                "checkpoint is yours (a custom scheduler or optimiser), pass trust_pickle=True "
                "to unpickle it. Never do that for a file from an untrusted source."
            ) from err
        warnings.warn(f"unpickling {file} with weights_only=False (trust_pickle=True)",
                      stacklevel=3)
        return torch.load(file, map_location=map_location, weights_only=False)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint (``step``, ``data_state``, ``extra``)."""
    meta = json.loads((Path(path) / META_FILE).read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this echomoe "
                         f"reads format {CHECKPOINT_FORMAT}")
    return meta


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into the given objects.

    Args:
        path: the checkpoint directory.
        model: loaded in place (``strict``: every key must match).
        optimizer, scheduler: loaded in place when given (the checkpoint must hold them).
        restore_rng: also restore the python / numpy / torch RNG states.
        map_location: device of the loaded optimiser / RNG tensors.
        trust_pickle: allow ``weights_only=False`` as a fallback (see the module docstring).

    Returns ``{"step", "data_state", "extra", "path"}``.
    """
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no {META_FILE})")
    meta = read_meta(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=strict,
                                     device=str(device))
    if strict and (missing or unexpected):  # older safetensors return instead of raising
        raise RuntimeError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    state = load_training_state(path / STATE_FILE, map_location, trust_pickle)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None:
            if state.get(name) is None:
                raise ValueError(f"{path} holds no {name} state")
            obj.load_state_dict(state[name])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": meta["step"], "data_state": meta["data_state"], "extra": meta["extra"],
            "path": path}


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that every file of the checkpoint at ``path`` reads back, without loading the
    weights into a model: ``meta.json`` (format and step), ``model.safetensors`` (its header,
    and that the data it declares is all there) and each ``training_state*.pt``
    (``torch.load(weights_only=True, mmap=True)``).  Returns the meta.

    Raises:
        CorruptCheckpointError: naming the first file that does not read back.
    """
    from safetensors import safe_open

    path = Path(path)
    meta_file = path / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT or not isinstance(meta.get("step"), int):
            raise ValueError(f"format {meta.get('format')!r} / step {meta.get('step')!r}")
    except (OSError, ValueError, AttributeError) as err:
        raise CorruptCheckpointError(f"{meta_file}: unreadable checkpoint meta "
                                     f"({type(err).__name__}: {err})") from err
    model_file = path / MODEL_FILE
    if model_file.exists():
        try:
            with safe_open(str(model_file), framework="pt") as f:
                sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            del sizes
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CorruptCheckpointError(f"{model_file}: unreadable weights "
                                         f"({type(err).__name__}: {err})") from err
    for state_file in sorted(path.glob("training_state*.pt")):
        try:
            torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            pass  # readable, but needs trust_pickle: load_checkpoint says so
        except Exception as err:  # RuntimeError (truncated zip), EOFError, ...
            raise CorruptCheckpointError(f"{state_file}: unreadable training state "
                                         f"({type(err).__name__}: {err})") from err
    return meta


def latest_valid_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest ``step_*`` checkpoint that passes :func:`verify_checkpoint`; each newer
    damaged one is skipped with a warning naming its file.  ``None`` when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as err:
            warnings.warn(f"skipping a damaged checkpoint: {err}", stacklevel=2)
            continue
        return path
    return None


# ----------------------------------------------------------------------------- listing
def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete ``step_*`` checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``step_*`` checkpoint with the highest step, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``step_*`` checkpoints (``best`` is never
    touched); returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = list_checkpoints(directory)[:-keep_last]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Clean up after interrupted saves: an ``.<name>.old-*`` copy whose ``<name>`` is missing
    (a crash between the two renames of a re-save) is renamed back; other hidden
    ``.*.tmp-*`` / ``.*.old-*`` leftovers are deleted.  Returns the deleted paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for child in sorted(directory.iterdir()):
        if not child.name.startswith("."):
            continue
        if ".old-" in child.name:
            target = directory / child.name[1:].split(".old-")[0]
            if not target.exists():
                os.replace(child, target)
                continue
        if ".tmp-" in child.name or ".old-" in child.name:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed
