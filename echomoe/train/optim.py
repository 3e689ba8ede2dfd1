"""Optimiser pieces of the training recipe: parameter groups, schedule, freezing, clipping, LoRA.

::

    groups = param_groups(model, weight_decay=0.01)          # named AdamW groups
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, schedule="cosine", warmup=10, total=200)
    apply_stage(model, Stage(name="projector", steps=50, trainable=("projector.*",)))
    norm = clip_gradients(model, max_norm=1.0)
    apply_lora(model, target_modules=["q_proj", "v_proj"], r=8, alpha=16)   # needs ``peft``

**Groups.**  Parameters are split twice: *expert* (routed experts of an MoE layer, see
:func:`is_expert_param`) vs the rest, and *decay* vs *no decay* (norms, biases, embeddings,
positional / class tokens and the region logit bias get no weight decay, see
:func:`is_no_decay_param`).  The non-empty groups are named ``decay``, ``no_decay``,
``expert_decay`` and ``expert_no_decay`` (the ``name`` key is kept in the optimiser state, so a
logger or a per-group learning-rate rule can find them).

**Stages.**  A :class:`Stage` lists the parameter-name patterns (:mod:`fnmatch`) trained during
its ``steps`` optimiser steps; everything else is frozen (``requires_grad=False``, so AdamW
neither updates nor decays it), and the learning rate of every group is multiplied by its
``lr_scale`` (:class:`StagedSchedule`, a function of the optimiser step only, so a resume
mid-stage gets the same rate).  :func:`echovlm_stages` gives the EchoVLM recipe: projector only
-> MoE layers + grounding heads -> everything.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from echomoe.config.rules import (
    SCHEDULES,
    check_betas,
    check_choice,
    check_fraction,
    check_int,
    check_non_negative,
    check_positive,
    check_warmup,
)
from echomoe.config.schema import Stage

DEFAULT_NO_DECAY: tuple[str, ...] = ("*.bias", "*pos_embed*", "*cls_token*", "*region_bias*")
"""Name patterns that never get weight decay (on top of norm / embedding modules and 1-d
parameters)."""

GROUP_NAMES: tuple[str, ...] = ("decay", "no_decay", "expert_decay", "expert_no_decay")


# ----------------------------------------------------------------------------- groups
def is_expert_param(name: str) -> bool:
    """Whether the parameter ``name`` belongs to the routed experts of an MoE layer.

    Routed experts live in a module called ``experts`` (``...mlp.moe.experts.gate_up_proj``);
    routers, shared experts, dense branches and path mixers are *not* expert parameters (every
    token uses them).
    """
    return "experts" in name.split(".")


def _no_decay_modules(model: nn.Module) -> set[str]:
    """Qualified names of the parameters owned by norm and embedding modules."""
    names = set()
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Embedding) or "Norm" in kind:
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def is_no_decay_param(name: str, param: torch.Tensor, *,
                      patterns: Sequence[str] = DEFAULT_NO_DECAY,
                      module_owned: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether ``param`` is exempt from weight decay: 0-d / 1-d tensors (biases, gains), names
    matching ``patterns``, or parameters in ``module_owned`` (norm / embedding weights)."""
    return (param.ndim <= 1 or name in module_owned
            or any(fnmatch.fnmatchcase(name, p) for p in patterns))


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    expert_lr_scale: float = 1.0,
    no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY,
    trainable_only: bool = False,
) -> list[dict]:
    """AdamW parameter groups ``[{"name", "params", "weight_decay", "lr_scale"}, ...]``.

    Args:
        model: the model.
        weight_decay: decay of the ``decay`` / ``expert_decay`` groups (0 for the others).
        expert_lr_scale: learning-rate multiplier of the expert groups.
        no_decay_patterns: extra :mod:`fnmatch` patterns of parameters without decay.
        trainable_only: skip frozen parameters.  The default keeps them (they get no gradient,
            so AdamW skips them) so a later training stage can unfreeze them.

    Empty groups are dropped; the order is :data:`GROUP_NAMES`.
    """
    check_non_negative(weight_decay, "weight_decay")
    owned = _no_decay_modules(model)
    buckets: dict[str, list[torch.Tensor]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        no_decay = is_no_decay_param(name, param, patterns=no_decay_patterns, module_owned=owned)
        key = ("expert_" if is_expert_param(name) else "") + ("no_decay" if no_decay else "decay")
        buckets[key].append(param)
    groups = []
    for name in GROUP_NAMES:
        if buckets[name]:
            groups.append({
                "name": name,
                "params": buckets[name],
                "weight_decay": 0.0 if name.endswith("no_decay") else weight_decay,
                "lr_scale": expert_lr_scale if name.startswith("expert") else 1.0,
            })
    if not groups:
        raise ValueError("the model has no parameters to optimise")
    return groups


def split_moe_groups(groups: list[dict]) -> list[dict]:
    """Split DeepSpeed-MoE parameters out of ``groups`` into their own ``"moe": True`` groups.

    DeepSpeed marks the parameters of its expert-parallel layers (``deepspeed.moe.layer.MoE``)
    with ``allreduce=False`` and a ``group_name`` (``"ep_size_<P>"``); under ZeRO each such
    parameter must sit in a group flagged ``"moe": True`` holding only parameters of that
    ``group_name``, or ``deepspeed.initialize`` fails ("the model has moe layers, but none of
    the param groups are marked as MoE").  This mirrors DeepSpeed's
    ``split_params_into_different_moe_groups_for_optimizer``: every group keeps its settings,
    its DeepSpeed-MoE parameters move to a copy with ``"moe": True`` whose ``name`` is the
    ``group_name`` (DeepSpeed looks the expert-data-parallel group up by it); empty groups are
    dropped.  Models without DeepSpeed-MoE layers (echomoe's
    own MoE layers) come back unchanged.
    """
    out = []
    for group in groups:
        plain, moe = [], {}
        for param in group["params"]:
            if getattr(param, "allreduce", True) is False:
                moe.setdefault(param.group_name, []).append(param)
            else:
                plain.append(param)
        if plain:
            out.append({**group, "params": plain})
        for group_name, params in moe.items():
            out.append({**group, "params": params, "moe": True, "name": group_name})
    return out


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    expert_lr_scale: float = 1.0,
    trainable_only: bool = False,
    moe_groups: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (group ``lr = lr * lr_scale``); ``moe_groups`` also
    splits DeepSpeed-MoE parameters into ``"moe": True`` groups (:func:`split_moe_groups`, as
    DeepSpeed ZeRO requires).  ``betas`` (two numbers in ``[0, 1)``) and ``eps`` (> 0) are
    AdamW's and reach every group."""
    check_positive(lr, "lr")
    betas = check_betas(betas)
    check_positive(eps, "eps")
    groups = param_groups(model, weight_decay=weight_decay, expert_lr_scale=expert_lr_scale,
                          trainable_only=trainable_only)
    if moe_groups:
        groups = split_moe_groups(groups)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class WarmupSchedule:
    """Learning-rate multiplier: linear warmup ``0 -> 1`` over ``warmup`` steps, then
    :meth:`decay` of the progress ``p = (s - warmup) / (total - warmup)`` (clamped to
    ``[0, 1]``, so the value at ``total`` holds afterwards).

    ``f(s) = s / warmup`` for ``s < warmup``, else ``decay(p)``.  The step ``s`` is the number
    of optimiser steps already taken (LambdaLR's convention), so the first step uses ``f(0)``
    (0 with warmup, the full rate without).  Subclasses define :meth:`decay`; the instance is a
    plain callable whose fields are numbers, so a ``LambdaLR`` holding it saves and reloads
    them with its ``state_dict``.
    """

    warmup: int
    total: int
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.total, "total", 1)
        check_warmup(self.warmup, "warmup", self.total, "total")
        check_fraction(self.min_ratio, "min_ratio")

    def decay(self, progress: float) -> float:
        """The multiplier after the warmup at ``progress`` in ``[0, 1]``."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        return self.decay(min((step - self.warmup) / max(1, self.total - self.warmup), 1.0))


@dataclass(frozen=True)
class WarmupCosine(WarmupSchedule):
    """Warmup, then a cosine decay to ``min_ratio`` at ``total`` steps (constant ``min_ratio``
    afterwards): ``f(s) = min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` (see
    :class:`WarmupSchedule` for ``p`` and the warmup)."""

    def decay(self, progress: float) -> float:
        """``min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2``."""
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupLinear(WarmupSchedule):
    """Warmup, then a linear decay to ``min_ratio`` at ``total`` steps (constant afterwards):
    ``f(s) = min_ratio + (1 - min_ratio) * (1 - p)``."""

    def decay(self, progress: float) -> float:
        """``min_ratio + (1 - min_ratio) * (1 - progress)``."""
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - progress)


@dataclass(frozen=True)
class WarmupConstant(WarmupSchedule):
    """Warmup, then the full rate until the end (``min_ratio`` is not used)."""

    def decay(self, progress: float) -> float:
        """``1.0`` at every progress."""
        return 1.0


_SCHEDULE_CLASSES: dict[str, type[WarmupSchedule]] = {
    "cosine": WarmupCosine, "linear": WarmupLinear, "constant": WarmupConstant}


def lr_schedule(schedule: str, *, warmup: int, total: int,
                min_ratio: float = 0.0) -> WarmupSchedule:
    """The multiplier of ``schedule`` (:data:`SCHEDULES`): :class:`WarmupCosine`,
    :class:`WarmupLinear` or :class:`WarmupConstant`."""
    check_choice(schedule, "schedule", SCHEDULES)
    return _SCHEDULE_CLASSES[schedule](warmup=warmup, total=total, min_ratio=min_ratio)


@dataclass(frozen=True)
class StagedSchedule:
    """The :func:`lr_schedule` multiplier times the ``lr_scale`` of the stage in force.

    ``f(s) = lr_schedule(schedule, warmup, total, min_ratio)(s) * scales[i]`` where ``i`` is the
    number of entries of ``ends`` that are ``<= s``: ``ends`` are the cumulative end steps of
    every stage but the last (``scales[i]`` holds from ``ends[i - 1]`` up to ``ends[i]``, the
    last scale until the end), the same rule as :func:`stage_at`.  The warmup and decay run
    over the whole run (``total`` steps), not per stage.  The multiplier depends on the step
    only, and the fields are a string, numbers and tuples of numbers, so a ``LambdaLR``
    holding it saves and reloads them with its ``state_dict`` (``weights_only=True``) and a
    resumed run continues with exactly the rates of an uninterrupted one.
    """

    schedule: str
    warmup: int
    total: int
    min_ratio: float = 0.0
    ends: tuple[int, ...] = ()
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        lr_schedule(self.schedule, warmup=self.warmup, total=self.total,
                    min_ratio=self.min_ratio)  # validates the base schedule
        if len(self.scales) != len(self.ends) + 1:
            raise ValueError(f"need one more scale than ends, got {len(self.scales)} scales "
                             f"and {len(self.ends)} ends")
        if any(not (math.isfinite(x) and x > 0) for x in self.scales):
            raise ValueError(f"scales must be finite numbers > 0, got {self.scales}")
        if any(b <= a for a, b in zip((0, *self.ends), self.ends, strict=False)):
            raise ValueError(f"ends must be increasing positive steps, got {self.ends}")

    @classmethod
    def from_stages(cls, stages: Sequence[Stage], *, schedule: str, warmup: int, total: int,
                    min_ratio: float = 0.0) -> StagedSchedule:
        """The multiplier for ``stages`` (their ``steps`` and ``lr_scale``; a stage with
        ``steps=None`` runs until the end, so later ones are never in force)."""
        if not stages:
            raise ValueError("stages is empty")
        ends, scales, end = [], [], 0
        for stage in stages:
            scales.append(float(stage.lr_scale))
            if stage.steps is None:
                break
            end += stage.steps
            ends.append(end)
        return cls(schedule=schedule, warmup=warmup, total=total, min_ratio=min_ratio,
                   ends=tuple(ends[:len(scales) - 1]), scales=tuple(scales))

    def scale(self, step: int) -> float:
        """The ``lr_scale`` of the stage in force at the optimiser step ``step`` (0-based)."""
        return self.scales[bisect.bisect_right(self.ends, step)]

    def __call__(self, step: int) -> float:
        base = lr_schedule(self.schedule, warmup=self.warmup, total=self.total,
                           min_ratio=self.min_ratio)
        return base(step) * self.scale(step)


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str = "cosine", warmup: int,
                    total: int, min_ratio: float = 0.0,
                    stages: Sequence[Stage] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with the :func:`lr_schedule` multiplier (same for every group; a group's
    rate is its initial ``lr`` times the multiplier).  With ``stages`` the multiplier is a
    :class:`StagedSchedule`: the schedule times the ``lr_scale`` of the stage in force, so a
    group's rate is ``lr * group lr_scale * schedule(step) * stage.lr_scale``.

    Its ``state_dict`` holds only numbers and strings (the dataclass fields), so it reloads
    with ``torch.load(weights_only=True)``; on reload the saved fields win.
    """
    if stages:
        lr_lambda = StagedSchedule.from_stages(stages, schedule=schedule, warmup=warmup,
                                               total=total, min_ratio=min_ratio)
    else:
        lr_lambda = lr_schedule(schedule, warmup=warmup, total=total, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int,
                            min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :class:`WarmupCosine`: ``build_scheduler(..., schedule="cosine")``."""
    return build_scheduler(optimizer, schedule="cosine", warmup=warmup, total=total,
                           min_ratio=min_ratio)


# ----------------------------------------------------------------------------- freezing
def _match(model: nn.Module, patterns: str | Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    named = list(model.named_parameters())
    found = []
    for pattern in patterns:
        hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(n for n, _ in named[:5])
            raise ValueError(f"pattern {pattern!r} matches no parameter (names look like: "
                             f"{examples}, ...)")
        found.extend(hits)
    return found


def freeze(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name matches any :mod:`fnmatch`
    pattern; a pattern that matches nothing is an error (typos do not pass silently).
    Returns the names frozen."""
    hits = _match(model, patterns)
    for _, param in hits:
        param.requires_grad_(False)
    return sorted({n for n, _ in hits})


def unfreeze(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Set ``requires_grad=True`` on matching parameters (see :func:`freeze`)."""
    hits = _match(model, patterns)
    for _, param in hits:
        param.requires_grad_(True)
    return sorted({n for n, _ in hits})


def stage_at(stages: Sequence[Stage], step: int) -> tuple[int, Stage]:
    """``(index, stage)`` in force for the optimiser step ``step`` (0-based); the last stage
    continues past its ``steps``."""
    if not stages:
        raise ValueError("stages is empty")
    end = 0
    for index, stage in enumerate(stages):
        if stage.steps is None:
            return index, stage
        end += stage.steps
        if step < end:
            return index, stage
    return len(stages) - 1, stages[-1]


def apply_stage(model: nn.Module, stage: Stage) -> list[str]:
    """Freeze every parameter, then unfreeze those matching ``stage.trainable``; returns the
    trainable names."""
    for param in model.parameters():
        param.requires_grad_(False)
    return unfreeze(model, stage.trainable)


HEAD_PATTERNS: tuple[str, ...] = ("pixel_decoder.*", "mask_decoder.*", "box_head.*",
                                  "keypoint_head.*", "region_classifier.*")


def echovlm_stages(*, projector_steps: int, moe_steps: int) -> list[Stage]:
    """EchoVLM's staged recipe: ``projector`` (projector only) -> ``moe_heads`` (projector,
    LM MoE layers and grounding heads) -> ``all`` (everything, until the end).

    Use with an MoE variant; on ``dense`` the ``*.mlp.moe.*`` pattern matches nothing and
    :func:`apply_stage` raises.
    """
    return [
        Stage(name="projector", steps=projector_steps, trainable=("projector.*",)),
        Stage(name="moe_heads", steps=moe_steps,
              trainable=("projector.*", "language_model.*.mlp.moe.*", *HEAD_PATTERNS)),
        Stage(name="all", steps=None, trainable=("*",)),
    ]


# ----------------------------------------------------------------------------- clipping
def clip_gradients(model_or_params: nn.Module | Iterable[torch.Tensor],
                   max_norm: float | None) -> float:
    """Clip the global gradient L2 norm to ``max_norm`` (``None`` / ``0``: no clipping) and
    return the norm *before* clipping (``inf`` / ``nan`` when a gradient is not finite)."""
    params = (model_or_params.parameters() if isinstance(model_or_params, nn.Module)
              else model_or_params)
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = float(max_norm) if max_norm else math.inf
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


# ----------------------------------------------------------------------------- LoRA
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA adapters of :func:`apply_lora` into their base weights and put the plain
    layers back, *in place*; returns ``model``.  Its ``state_dict`` then has the keys of the
    model without LoRA, so ``save_pretrained`` gives a checkpoint that reloads with its trained
    weights (unmerged, ``q_proj.base_layer.weight`` and ``lora_A`` / ``lora_B`` would not
    match any weight of a fresh model).  A model without adapters is returned unchanged."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, LoraLayer)]
    for name, module in layers:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def apply_lora(
    model: nn.Module,
    *,
    target_modules: Sequence[str],
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    trainable: Sequence[str] = (),
) -> nn.Module:
    """Add LoRA adapters (``peft``) to ``model`` *in place* and return it.

    The model keeps its class and ``forward`` (``peft.inject_adapter_in_model``, no
    ``PeftModel`` wrapper), so the loop and checkpoints treat it like any model.  Only the
    adapters are trainable afterwards, plus the modules named in ``trainable`` (trained fully,
    like peft's ``modules_to_save``).  ``target_modules`` are ``nn.Linear`` name suffixes such
    as ``"q_proj"``; the grouped expert weights (3-d parameters, not ``nn.Linear``) cannot take
    LoRA adapters, so MoE layers are trained through ``trainable`` (e.g. ``"mlp"``).

    An entry of ``trainable`` without wildcards is a module name suffix (peft's rule: the
    module's qualified name equals it or ends with ``".<entry>"``, so ``"mlp"`` selects every
    ``*.mlp`` module, ``"box_head"`` the box head); an entry with ``*`` / ``?`` / ``[`` is an
    :mod:`fnmatch` pattern over parameter names (``"box_head.*"``).  An entry that selects
    nothing is an error.

    Raises:
        ImportError: when ``peft`` is not installed (``pip install peft``).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("apply_lora needs the optional dependency `peft`; install it with "
                          "`pip install peft` (it does not change torch)") from err
    if not target_modules:
        raise ValueError("target_modules must name at least one module, e.g. ['q_proj']")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules))
    model = inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for entry in trainable:
        unfreeze_modules(model, entry)
    return model


def unfreeze_modules(model: nn.Module, names: str | Iterable[str]) -> list[str]:
    """Set ``requires_grad=True`` on every parameter of the modules named by ``names`` (module
    name suffixes, or :mod:`fnmatch` parameter-name patterns when they hold a wildcard; see
    :func:`apply_lora`).  Returns the parameter names unfrozen."""
    names = [names] if isinstance(names, str) else list(names)
    found: set[str] = set()
    for entry in names:
        if any(c in entry for c in "*?["):
            found.update(unfreeze(model, entry))
            continue
        hits = [(f"{m}.{n}" if m else n, p) for m, module in model.named_modules()
                if m == entry or m.endswith(f".{entry}")
                for n, p in module.named_parameters()]
        if not hits:
            raise ValueError(f"module name {entry!r} matches no module with parameters (use a "
                             "name such as 'box_head' or 'mlp', or an fnmatch pattern over "
                             "parameter names such as 'box_head.*')")
        for name, param in hits:
            param.requires_grad_(True)
            found.add(name)
    return sorted(found)
