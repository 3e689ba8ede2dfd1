"""The training recipe: an explicit loop (:func:`train`), optimiser pieces and checkpoints.

Importing ``echomoe.train`` needs torch, numpy, safetensors and tqdm only; ``peft`` is imported
by :func:`apply_lora` when it is called.
"""

from echomoe.train.batches import FactoryBatches, IndexedBatches, MultiTaskBatches
from echomoe.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from echomoe.train.loop import (
    History,
    NonFiniteLossError,
    make_loss_eval,
    make_strategy,
    set_loss_weights,
    train,
)
from echomoe.train.optim import (
    SCHEDULES,
    Stage,
    StagedSchedule,
    WarmupConstant,
    WarmupCosine,
    WarmupLinear,
    WarmupSchedule,
    apply_lora,
    apply_stage,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    echovlm_stages,
    freeze,
    is_expert_param,
    lr_schedule,
    merge_lora,
    param_groups,
    stage_at,
    unfreeze,
    warmup_cosine_scheduler,
)

__all__ = [
    "SCHEDULES",
    "FactoryBatches",
    "History",
    "IndexedBatches",
    "MultiTaskBatches",
    "NonFiniteLossError",
    "Stage",
    "StagedSchedule",
    "WarmupConstant",
    "WarmupCosine",
    "WarmupLinear",
    "WarmupSchedule",
    "apply_lora",
    "merge_lora",
    "apply_stage",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "echovlm_stages",
    "freeze",
    "is_expert_param",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "lr_schedule",
    "make_loss_eval",
    "make_strategy",
    "param_groups",
    "save_checkpoint",
    "seed_everything",
    "set_loss_weights",
    "stage_at",
    "train",
    "unfreeze",
    "warmup_cosine_scheduler",
]
