"""Loading (``base`` chains, dotlist overrides, interpolation) and validation of experiment
YAMLs into :class:`~echomoe.config.schema.ExperimentConfig` (see :mod:`echomoe.config`)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from echomoe.config import rules
from echomoe.config.schema import (
    CHOICES,
    RENAMED,
    TRAIN_SPLIT_TOKENIZER,
    ConfigError,
    ExperimentConfig,
)
from echomoe.data.synthetic.generate import SyntheticConfig
from echomoe.data.tasks import TASKS, check_rates


# ----------------------------------------------------------------------------- key checks
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _free_dict_keys(section: str) -> tuple[str, ...] | None:
    """Valid keys of a free-form dict field (``None``: anything)."""
    if section == "model.overrides":
        from echomoe.models.configuration import EchoMoEConfig

        params = inspect.signature(EchoMoEConfig.__init__).parameters
        return tuple(n for n, p in params.items()
                     if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)
    if section == "data.synthetic":
        return tuple(f.name for f in dataclasses.fields(SyntheticConfig))
    return None


def _unwrap(tp):
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _unknown(where: str, key: str, section: str, valid) -> ConfigError:
    label = f"section {section!r}" if section else "the top level"
    return ConfigError(f"{where}: unknown key {key!r} in {label}; valid keys: "
                       f"{', '.join(valid)}")


def _check_keys(data: Any, cls, where: str, section: str = "") -> None:
    """Raise on any key of ``data`` (a plain dict, possibly partial) not in ``cls``'s schema."""
    if not isinstance(data, dict):
        return
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise _unknown(where, str(key), section, list(hints))
        path = f"{section}.{key}" if section else key
        _check_value_keys(value, hints[key], where, path)


def _check_value_keys(value: Any, tp, where: str, path: str) -> None:
    tp = _unwrap(tp)
    if dataclasses.is_dataclass(tp):
        _check_keys(value, tp, where, path)
    elif typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            for i, v in enumerate(value):
                _check_keys(v, item, where, f"{path}[{i}]")
    elif typing.get_origin(tp) is dict and isinstance(value, dict):
        valid = _free_dict_keys(path)
        for key in value if valid is not None else ():
            if key not in valid:
                raise _unknown(where, str(key), path, valid)


def _renamed(data: Any, where: str, warn: bool = True) -> Any:
    """``data`` (a plain dict of sections) with the old field names of :data:`RENAMED` moved
    to their new names, in place (a ``FutureWarning`` says so)."""
    if not isinstance(data, dict):
        return data
    for old, new in RENAMED.items():
        *parents, old_key = old.split(".")
        new_key = new.rsplit(".", 1)[1]
        values = data
        for part in parents:
            values = values.get(part) if isinstance(values, dict) else None
        if not (isinstance(values, dict) and old_key in values):
            continue
        if new_key in values:
            raise ConfigError(f"{where}: {old} and {new} are both set ({old} is the old name "
                              f"of {new}); keep {new}")
        if warn:
            warnings.warn(f"{where}: {old} is now called {new}; the old name still loads",
                          FutureWarning, stacklevel=4)
        values[new_key] = values.pop(old_key)
    return data


def _check_dotted_key(key: str, where: str, value: Any = None) -> None:
    """Raise unless ``key`` (``"train.lr"``, ``"model.overrides.moe_config.top_k"``) exists
    (and, when ``value`` is a mapping, its keys too)."""
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"{where}: malformed key {key!r} (expected dotted names, e.g. "
                          "train.lr)")
    for part in reversed(key.split(".")):
        value = {part: value}
    _check_keys(_renamed(value, where, warn=False), ExperimentConfig, where)


# ----------------------------------------------------------------------------- loading
def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """OmegaConf merge semantics on plain dicts: mappings merge key by key, the rest
    (lists included) is replaced.  A mapping whose ``kind`` differs from the base mapping's
    (``vision_config: {kind: convnet, ...}`` over a ViT's) replaces it: the base's other keys
    belong to the other kind."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) \
                and value.get("kind", out[key].get("kind")) == out[key].get("kind"):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_FILE_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}


def _load_yaml_file(path: Path) -> Any:
    """Unresolved content of one YAML file (cached by path, mtime and size; OmegaConf is slow
    and sweeps load the same experiment for every run)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _FILE_CACHE:
        _FILE_CACHE[key] = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return copy.deepcopy(_FILE_CACHE[key])


def yaml_error(path: Path, err: Exception) -> ConfigError:
    """A YAML parse failure as a :class:`ConfigError` naming the file and the line (PyYAML's
    own messages quote whole lines; a ``!!python/...`` tag is named as refused, never run)."""
    import yaml

    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    if isinstance(err, yaml.constructor.ConstructorError) and "python/" in str(err.problem):
        tag = re.search(r"tag '([^']+)'", str(err.problem))
        return ConfigError(f"{where}: the tag {tag.group(1) if tag else '!!python'} is not "
                           "allowed (configs are plain YAML; nothing in them is executed)")
    if isinstance(err, yaml.YAMLError):
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        return ConfigError(f"{where}: invalid YAML: {problem}"
                           + (f" ({context})" if context else ""))
    return ConfigError(f"{path}: cannot parse YAML: {err}")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``path`` merged over its ``base`` files (unresolved plain dict), keys checked per file."""
    if not path.is_file():
        where = f"{chain[-1]}: base" if chain else "config"
        raise ConfigError(f"{where}: file {str(path)!r} not found")
    if path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"{path}: circular base chain: {' -> '.join(map(str, chain))}")
    import yaml

    try:
        data = _load_yaml_file(path)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as err:
        raise yaml_error(path, err) from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    _check_keys(_renamed(data, str(path)), ExperimentConfig, str(path))
    if isinstance(data.get("deepspeed"), str) and not os.path.isabs(data["deepspeed"]):
        data["deepspeed"] = os.path.normpath(os.path.join(path.parent, data["deepspeed"]))
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, (*chain, path)))
    return _deep_merge(merged, data)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str, path: str) -> Any:
    """``value`` checked against type ``tp`` (dataclasses built recursively)."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: {path} must not be null")
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path} must be a mapping, got {value!r}")
        hints = _hints(tp)
        fields = {k: _coerce(v, hints[k], where, f"{path}.{k}" if path else k)
                  for k, v in value.items()}
        try:
            return tp(**fields)
        except ValueError as err:  # a rule of the dataclass itself (e.g. Stage)
            raise ConfigError(f"{where}: {path}: {err}") from err
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {path} must be a list, got {value!r}")
        (item, _) = typing.get_args(tp)  # tuple[X, ...]
        return tuple(_coerce(v, item, where, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {path} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path} must be a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: {path} must be {_type_name(tp)}, got {value!r}")


def _parse_overrides(overrides, where: str = "command line") -> dict[str, Any]:
    items = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{where}: override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        _check_dotted_key(key, f"{where}: override {item!r}")
        items.append(item)
    try:
        data = OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: cannot parse overrides {items}: {err}") from err
    data = _renamed(data, where)
    _check_keys(data, ExperimentConfig, where)  # keys inside mapping values, e.g. tasks={...}
    return data


def load_config(path: str | os.PathLike, overrides=()) -> ExperimentConfig:
    """Load, merge (``base`` files, then ``overrides``) and validate an experiment YAML.

    Args:
        path: experiment YAML.
        overrides: ``["train.lr=1e-3", "model.variant=moe_topk", ...]`` (dotlist).

    Raises :class:`ConfigError` (a ``ValueError``) naming the file and field.
    """
    path = Path(path)
    data = _read_yaml(path)
    override_data = _parse_overrides(list(overrides))
    merged = _deep_merge(data, override_data)
    if merged.get("name") is None:
        merged["name"] = path.stem  # before resolving, so ${name} interpolations see it
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot resolve interpolation: {err}") from err
    where = f"{path}" + (" (with command-line overrides)" if override_data else "")
    config = _coerce(resolved, ExperimentConfig, where, "")
    if config.output_dir is None:
        config.output_dir = os.path.join("runs", config.name)
    validate(config, where)
    return config


# ----------------------------------------------------------------------------- validation
def _fail(where: str, field_name: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {field_name} {message}")


def _rule(where: str, check, value, name: str, *args) -> None:
    """``check(value, name, *args)`` (a :mod:`echomoe.config.rules` rule) with its
    ``ValueError`` as a :class:`ConfigError` naming ``where``."""
    try:
        check(value, name, *args)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err


def validate(config: ExperimentConfig, where: str = "config") -> None:
    """Check every value of ``config`` (types are checked by :func:`load_config`) with the
    rules of :mod:`echomoe.config.rules`, the ones the training functions apply too."""
    from echomoe.models.builders import PRESETS, VARIANTS

    for dotted, valid in CHOICES.items():
        section, name = dotted.split(".")
        _rule(where, rules.check_choice, getattr(getattr(config, section), name), dotted, valid)
    if not config.name or "/" in config.name:
        raise _fail(where, "name", f"must be a non-empty name without '/', got {config.name!r}")
    # model
    m = config.model
    _rule(where, rules.check_choice, m.preset, "model.preset", tuple(PRESETS))
    _rule(where, rules.check_choice, m.variant, "model.variant", tuple(VARIANTS))
    if m.tokenizer not in (None, TRAIN_SPLIT_TOKENIZER) and not Path(m.tokenizer).is_dir():
        raise _fail(where, "model.tokenizer", f"directory {m.tokenizer!r} does not exist")
    _rule(where, rules.check_int, m.corpus_samples, "model.corpus_samples", 1)
    if m.backbone is not None and m.tokenizer is not None:
        raise _fail(where, "model.tokenizer", f"is {m.tokenizer!r}, but model.backbone brings "
                    "its own tokenizer: leave it null")
    # A backbone directory absent here (a path on the training machine) is read at build time.
    if m.backbone is None or (Path(m.backbone) / "config.json").is_file():
        try:
            m.build_config()
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise _fail(where, "model", f"is invalid: {err}") from err
    _validate_data(config, where)
    # tasks
    try:
        check_rates(config.tasks.rates(), name="tasks")
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err
    _validate_train(config, where)
    # eval
    e = config.eval
    bad = [task for task in e.tasks if task not in TASKS]
    if bad or not e.tasks:
        raise _fail(where, "eval.tasks", f"has unknown or no tasks {bad}; valid: "
                    f"{', '.join(TASKS)}")
    _rule(where, rules.check_int, e.batch_size, "eval.batch_size", 1)
    _rule(where, rules.check_int, e.max_new_tokens, "eval.max_new_tokens", 1)
    _rule(where, rules.check_int, e.report_samples, "eval.report_samples", 1)
    _rule(where, rules.check_positive, e.report_temperature, "eval.report_temperature")
    _rule(where, rules.check_choice, e.report_pool, "eval.report_pool", ("none", "train"))
    if e.report_pool != "none" and e.report_samples < 2:
        raise _fail(where, "eval.report_pool", f"{e.report_pool!r} needs eval.report_samples "
                    f">= 2 (the samples are the evidence), got {e.report_samples}")
    if e.num_samples is not None:
        _rule(where, rules.check_int, e.num_samples, "eval.num_samples", 1)
    _rule(where, rules.check_int, config.logging.log_every, "logging.log_every", 1)
    _rule(where, rules.check_int, config.logging.num_predictions, "logging.num_predictions", 0)
    # deepspeed
    if config.deepspeed is not None:
        try:
            _read_deepspeed(config.deepspeed)
        except ValueError as err:
            raise _fail(where, "deepspeed", str(err)) from err


def _validate_data(config: ExperimentConfig, where: str) -> None:
    d = config.data
    if d.source == "disk":
        if not d.path:
            raise _fail(where, "data.path", "is required when data.source is 'disk'")
        if not Path(d.path).exists():
            raise _fail(where, "data.path", f"dataset {d.path!r} does not exist (create it "
                        "with `echomoe synth --out ...` or use data.source=synthetic)")
        splits_file = Path(d.path) / "dataset_dict.json"
        if splits_file.is_file():
            splits = json.loads(splits_file.read_text()).get("splits", [])
            for name in ("train_split", "eval_split", "test_split"):
                if getattr(d, name) not in splits:
                    raise _fail(where, f"data.{name}", f"{getattr(d, name)!r} is not a split "
                                f"of {d.path!r}; splits: {', '.join(splits)}")
    else:
        if d.n < 10:
            raise _fail(where, "data.n", f"must be >= 10 (every split non-empty), got {d.n}")
        try:
            d.synthetic_config()
        except (ValueError, TypeError) as err:
            raise _fail(where, "data.synthetic", f"is invalid: {err}") from err
    _rule(where, rules.check_int, d.num_proc, "data.num_proc", 1)
    _rule(where, rules.check_int, d.num_workers, "data.num_workers", 0)
    if d.max_length is not None:
        _rule(where, rules.check_int, d.max_length, "data.max_length", 1)


def _validate_train(config: ExperimentConfig, where: str) -> None:
    """The ``train`` section: each field with the rule of the ``train()`` argument it feeds."""
    t = config.train
    for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("keep_last", 1),
                      ("eval_every", 0), ("checkpoint_every", 0), ("seed", 0)):
        _rule(where, rules.check_int, getattr(t, name), f"train.{name}", low)
    _rule(where, rules.check_positive, t.lr, "train.lr")
    _rule(where, rules.check_positive, t.eps, "train.eps")
    _rule(where, rules.check_non_negative, t.weight_decay, "train.weight_decay")
    _rule(where, rules.check_warmup, t.warmup, "train.warmup", t.steps, "train.steps")
    _rule(where, rules.check_fraction, t.min_lr_ratio, "train.min_lr_ratio")
    if t.clip is not None:
        _rule(where, rules.check_positive, t.clip, "train.clip")
    _rule(where, rules.check_betas, t.betas, "train.betas")
    _rule(where, rules.check_stage_plan, [s.steps for s in t.stages], "train.stages", t.steps,
          "train.steps")
    lora = t.lora
    for name in ("r", "alpha"):
        _rule(where, rules.check_int, getattr(lora, name), f"train.lora.{name}", 1)
    _rule(where, rules.check_fraction, lora.dropout, "train.lora.dropout", False)


def _read_deepspeed(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"file {path!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} must hold a JSON object")
    return data


def deepspeed_config(config: ExperimentConfig) -> dict[str, Any] | None:
    """The DeepSpeed dict of ``config`` with ``"auto"`` values filled from ``train``.

    ``train_micro_batch_size_per_gpu`` <- ``batch_size``, ``gradient_accumulation_steps`` <-
    ``grad_accum``, ``gradient_clipping`` <- ``clip`` (0 = off), ``bf16.enabled`` <-
    ``precision == "bf16"`` for ``precision`` ``bf16`` / ``fp32`` (with ``auto`` it stays
    ``"auto"``: the DeepSpeed strategy enables bf16 on CUDA only); ``train_batch_size:
    "auto"`` is dropped (DeepSpeed derives it).  ``None`` when ``config.deepspeed`` is unset.
    """
    if config.deepspeed is None:
        return None
    data = _read_deepspeed(config.deepspeed)
    fill = {"train_micro_batch_size_per_gpu": config.train.batch_size,
            "gradient_accumulation_steps": config.train.grad_accum,
            "gradient_clipping": config.train.clip or 0.0}
    for key, value in fill.items():
        if data.get(key) == "auto":
            data[key] = value
    if data.get("train_batch_size") == "auto":
        del data["train_batch_size"]
    bf16 = data.get("bf16")
    if (isinstance(bf16, dict) and bf16.get("enabled") == "auto"
            and config.train.precision != "auto"):
        bf16["enabled"] = config.train.precision == "bf16"
    return data


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict of ``config`` (JSON / YAML serialisable: tuples become lists; loads
    back identically)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: ExperimentConfig, path: str | os.PathLike) -> Path:
    """Write ``config`` as a resolved YAML (no ``base``) that :func:`load_config` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config_to_dict(config)), path)
    return path
