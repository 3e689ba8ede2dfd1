"""Experiment config schema: one dataclass per section (see :mod:`echomoe.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from echomoe.config.rules import MODES, PRECISIONS, SCHEDULES, check_stage
from echomoe.data.synthetic.generate import SyntheticConfig
from echomoe.data.tasks import TASKS

TRAIN_SPLIT_TOKENIZER = "train_split"
"""``model.tokenizer`` value that trains the tokenizer on the train split's texts."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


# ----------------------------------------------------------------------------- schema
@dataclass
class ModelSection:
    """Which model to build: ``build_config(preset, variant, **overrides)``.

    Attributes:
        preset: size preset (:data:`echomoe.models.builders.PRESETS`: ``tiny``, ``small``).
        variant: FFN layout (:data:`echomoe.models.builders.VARIANTS`).
        overrides: :class:`~echomoe.models.configuration.EchoMoEConfig` fields; nested
            ``vision_config`` / ``text_config`` / ``moe_config`` / ``grounding_config`` dicts are
            merged into the preset's; ``loss_weights`` sets the loss coefficients (incl. MoE aux
            losses ``moe_balance``, ``moe_z``, ``moe_region``).
        tokenizer: local directory of a saved tokenizer; ``"train_split"`` trains a byte-level
            BPE offline on the train split's own texts (reports, questions, answers, prompts:
            :func:`~echomoe.models.builders.corpus_texts`), for real data in any language;
            ``None`` trains one offline on synthetic texts
            (:func:`~echomoe.models.builders.build_processor`).
        corpus_samples: synthetic cases for that synthetic-corpus tokenizer.
        backbone: local directory of a pretrained HF VLM (Qwen2-VL, Qwen2.5-VL, LLaVA) whose
            vision tower, projector and LM replace the preset's
            (:mod:`echomoe.models.backbone`; its own tokenizer, so ``tokenizer`` stays
            ``null``); relative to the working directory.  A directory absent on this machine
            is read, and the model section checked, when the model is built.
        diagnosis_head: an auxiliary image-level diagnosis classifier on the pooled vision
            tokens, over the dataset's diagnosis labels (``EchoMoEConfig.diagnoses``; loss
            weight ``diagnosis_cls``), trained on every train row whose image has a diagnosis.
    """

    preset: str = "tiny"
    variant: str = "dense"
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    corpus_samples: int = 200
    backbone: str | None = None
    diagnosis_head: bool = False

    def tokenizer_from_train_split(self) -> bool:
        """Whether the tokenizer is trained on the train split (``tokenizer: train_split``)."""
        return self.tokenizer == TRAIN_SPLIT_TOKENIZER

    def build_config(self):
        """The :class:`~echomoe.models.configuration.EchoMoEConfig` of this section."""
        from echomoe.models.builders import build_config

        overrides = dict(self.overrides)
        if self.backbone is not None:
            if overrides.get("backbone") is not None:
                raise ValueError("give the backbone as model.backbone or model.overrides."
                                 "backbone, not both")
            overrides["backbone"] = {"path": self.backbone}
        return build_config(self.preset, self.variant, **overrides)


@dataclass
class DataSection:
    """The dataset.

    Attributes:
        source: ``"synthetic"`` (generate ``n`` cases) or ``"disk"`` (a ``DatasetDict`` saved
            with ``save_to_disk`` / ``echomoe synth`` at ``path``, which must exist).
        path: ``disk``: the saved dataset; ``synthetic``: optional cache directory (loaded when
            it exists, else generated and saved there).
        n: synthetic cases (80/10/10 region-stratified split; >= 10).
        seed: synthetic generation seed.
        num_proc: generation worker processes (results do not depend on it).
        synthetic: :class:`~echomoe.data.synthetic.generate.SyntheticConfig` knobs
            (``image_size``, ``noise``, ``lesion_contrast``, ...).
        train_split / eval_split / test_split: split names (periodic eval uses ``eval_split``,
            the final evaluation ``test_split``).
        max_length: collator maximum sequence length (``None``: no truncation).
        num_workers: ``DataLoader`` workers.
        blind: withhold the images (every split: each image becomes a constant image of its
            size, :func:`~echomoe.data.schema.withhold_images`): the *blind* baseline run.
    """

    source: str = "synthetic"
    path: str | None = None
    n: int = 1000
    seed: int = 0
    num_proc: int = 1
    synthetic: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    max_length: int | None = None
    num_workers: int = 0
    blind: bool = False

    def synthetic_config(self) -> SyntheticConfig:
        """The :class:`SyntheticConfig` of ``synthetic`` (lists become tuples)."""
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.synthetic.items()}
        return SyntheticConfig(**knobs)


@dataclass
class TaskRates:
    """Relative sampling rate per task (:data:`echomoe.data.tasks.TASKS`); 0 disables a task.

    Rates are finite and >= 0, at least one positive; see
    :class:`~echomoe.data.tasks.TaskSampler`.
    """

    report: float = 1.0
    vqa: float = 1.0
    diagnosis: float = 1.0
    segment: float = 1.0
    detect: float = 1.0
    measure: float = 1.0

    def rates(self) -> dict[str, float]:
        """``{task: rate}`` in :data:`TASKS` order, for ``TaskSampler(rates)``."""
        return {t: float(getattr(self, t)) for t in TASKS}

    def active(self) -> list[str]:
        """Tasks with a positive rate."""
        return [t for t, r in self.rates().items() if r > 0]


@dataclass(frozen=True)
class Stage:
    """One training stage (EchoVLM style: projector -> MoE + heads -> all): ``steps``
    optimiser steps during which only the parameters matching ``trainable`` train, at
    ``lr_scale`` times the scheduled learning rate.  The same object is a YAML entry of
    ``train.stages`` and an argument of :func:`echomoe.train.train` (``stages=``).

    Attributes:
        name: stage label (logged).
        steps: optimiser steps of the stage; ``None`` (the last stage): until the end.
        trainable: :mod:`fnmatch` patterns over ``named_parameters()`` names that train in
            this stage (e.g. ``"projector.*"``, ``"*.mlp.*"``); everything else is frozen.
        lr_scale: multiplier (> 0) on the learning rate during the stage: every parameter
            group trains at ``lr * schedule(step) * lr_scale`` (times the group's own scale;
            see :class:`~echomoe.train.optim.StagedSchedule`); the warmup / decay schedule
            runs over all the steps, not per stage.
    """

    name: str = "stage"
    steps: int | None = None
    trainable: tuple[str, ...] = ("*",)
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check_stage(self.name, self.steps, self.trainable, self.lr_scale)


@dataclass
class LoraSection:
    """LoRA via ``peft`` on the language model (off by default).

    ``target_modules`` are module-name suffixes; ``trainable`` modules (peft's
    ``modules_to_save``) are trained fully (:func:`~echomoe.train.optim.apply_lora`).
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable: list[str] = field(default_factory=list)


@dataclass
class TrainSection:
    """Optimisation (AdamW, warmup + schedule), checkpoints and stages.

    Every field that :func:`echomoe.train.train` takes has its argument's name.
    ``steps`` counts optimizer steps (each of ``grad_accum`` micro-batches of ``batch_size``);
    ``schedule``: ``cosine`` / ``linear`` decay to ``min_lr_ratio * lr`` after ``warmup``
    steps of linear warmup, or ``constant``.  ``clip``: max gradient norm (``None``: off).
    ``eval_every`` / ``checkpoint_every``: in steps (0: only at the end); the best checkpoint
    is chosen by ``metric`` (``mode`` ``min`` / ``max``); ``keep_last`` ``step_*``
    checkpoints are kept.
    ``group_by_length``: batch training samples of similar sequence length together (far
    less padding; see :class:`~echomoe.train.MultiTaskBatches`).  ``pack_turns``: fill each
    training row's padding with further turns about the same image (same batch shape, more
    supervised targets; see :class:`~echomoe.train.MultiTaskBatches`).  ``precision``
    ``auto`` = fp32 on CPU, bf16 on GPU.  ``stages`` empty = train everything for ``steps``;
    otherwise their ``steps`` must sum to ``steps`` and each stage's ``lr_scale`` multiplies
    the scheduled learning rate while it is in force.  ``resume``: continue from the latest
    checkpoint in ``output_dir`` when there is one.
    """

    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 50
    schedule: str = "cosine"
    batch_size: int = 8
    grad_accum: int = 1
    group_by_length: bool = False
    pack_turns: bool = False
    clip: float | None = 1.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_last: int = 2
    metric: str = "eval/loss"
    mode: str = "min"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    resume: bool = True
    stages: list[Stage] = field(default_factory=list)
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class EvalSection:
    """Evaluation with generation: ``tasks`` (subset of :data:`TASKS`), ``num_samples`` examples
    of the split (``None``: all), ``max_new_tokens`` per generation, ``seed`` for the prompt
    phrasing (the same for every run by default, so that runs are scored on identical examples
    and can be compared case by case), ``closed``: ``rank`` answers closed questions and
    diagnoses with their most likely option, ``generate`` with the free generation, and
    ``language`` the text metrics' tokenisation (``auto``: CJK character level when the
    references have ideographs; ``en``; ``zh``), ``report_samples``: ``1`` decodes reports
    greedily, ``N > 1`` by minimum Bayes risk over ``N`` samples (:mod:`echomoe.models.decoding`)
    drawn at ``report_temperature``, ``report_pool`` further hypotheses of that choice
    (``none``; ``train``: the train split's reports, chosen where they agree with the model's
    samples more than any sample does), and ``measure`` where lesion calipers come from
    (``keypoints``: the ``[KPT]`` head; ``mask``: the outline of the lesion the model segments;
    :func:`~echomoe.metrics.harness.evaluate_model`)."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    batch_size: int = 16
    max_new_tokens: int = 64
    num_samples: int | None = None
    seed: int = 0
    closed: str = "rank"
    language: str = "auto"
    report_samples: int = 1
    report_temperature: float = 1.0
    report_pool: str = "none"
    measure: str = "keypoints"


@dataclass
class LoggingSection:
    """W&B (``mode`` ``offline`` by default; the ``WANDB_MODE`` environment variable wins) plus
    a local JSONL / CSV log that is always written.  ``dir`` ``None`` = ``output_dir``."""

    project: str = "echomoe"
    entity: str | None = None
    mode: str = "offline"
    dir: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_every: int = 10
    num_predictions: int = 8


@dataclass
class ExperimentConfig:
    """A whole experiment.  ``name`` defaults to the YAML file's stem, ``output_dir`` to
    ``runs/<name>``; ``deepspeed`` is an optional DeepSpeed JSON (see :func:`deepspeed_config`).
    """

    name: str | None = None
    description: str = ""
    output_dir: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tasks: TaskRates = field(default_factory=TaskRates)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deepspeed: str | None = None


CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "disk"),
    "train.schedule": SCHEDULES,
    "train.mode": MODES,
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": PRECISIONS,
    "logging.mode": ("online", "offline", "disabled"),
    "eval.closed": ("rank", "generate"),
    "eval.language": ("auto", "en", "zh"),
    "eval.measure": ("keypoints", "mask"),
}
"""Allowed values of the string fields that are enumerations."""

RENAMED: dict[str, str] = {
    "train.warmup_steps": "train.warmup",
    "train.best_metric": "train.metric",
    "train.best_mode": "train.mode",
    "train.keep_checkpoints": "train.keep_last",
    "train.lora.modules_to_save": "train.lora.trainable",
}
"""Old field names that still load (with a ``FutureWarning``) under their new name."""

DEEPSPEED_REQUIRED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                           "gradient_clipping", "zero_optimization", "bf16")
"""Keys every shipped DeepSpeed JSON has (``"auto"`` values are filled from ``train``)."""
