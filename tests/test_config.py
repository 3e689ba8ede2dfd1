"""Experiment configs: every shipped YAML / JSON validates; inheritance, overrides, errors,
sweeps (echomoe.config)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from echomoe.config import (
    DEEPSPEED_REQUIRED_KEYS,
    ConfigError,
    ExperimentConfig,
    TaskRates,
    config_to_dict,
    deepspeed_config,
    format_value,
    load_config,
    load_sweep,
    main,
    read_sweep,
    save_config,
)
from echomoe.data.tasks import TASKS
from echomoe.models.builders import EQUAL_ACTIVE_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml")) + sorted(
    (CONFIGS / "models").glob("*.yaml"))
SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))
DEEPSPEED = sorted((CONFIGS / "deepspeed").glob("*.json"))
BASE = CONFIGS / "experiments" / "base.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_files_exist():
    names = {p.stem for p in EXPERIMENTS}
    assert {"base", "report", "vqa", "grounding", "multitask", "tiny", "small"} <= names
    assert {p.stem for p in SWEEPS} >= {"dense_vs_moe", "demo"}
    assert {p.stem for p in DEEPSPEED} >= {f"zero{s}{b}" for s in (1, 2, 3) for b in ("", "_bf16")}


# ----------------------------------------------------------------------------- shipped files
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name and cfg.output_dir
    if path.parent.name == "experiments" and path.stem != "base":
        raw = OmegaConf.to_container(OmegaConf.load(path))
        assert "base" in raw, "experiments are base + overrides"
        assert cfg.name == path.stem
    if cfg.deepspeed is not None:
        assert Path(cfg.deepspeed).is_file()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_yaml_expands_and_every_run_validates(path):
    sweep = read_sweep(path)
    assert sweep.runs
    for run_name, _ in sweep.runs:
        cfg = sweep.load(run_name)
        assert cfg.name == run_name
        assert cfg.logging.group == sweep.name
        assert cfg.output_dir == f"{sweep.output_dir}/{run_name}"


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_every_deepspeed_json(path):
    data = json.loads(path.read_text())
    for key in DEEPSPEED_REQUIRED_KEYS:
        assert key in data, f"{path.name} lacks {key}"
    stage = int(path.stem[len("zero")])
    assert data["zero_optimization"]["stage"] == stage
    assert data["bf16"]["enabled"] is path.stem.endswith("_bf16")
    # no optimizer block (the training loop passes torch AdamW), or torch_adam: no fused-Adam JIT
    assert "optimizer" not in data or data["optimizer"].get("params", {}).get("torch_adam")
    cfg = load_config(BASE, [f"deepspeed={path}", "train.batch_size=4", "train.grad_accum=3",
                             "train.clip=0.5"])
    filled = deepspeed_config(cfg)
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["gradient_clipping"] == 0.5
    assert "auto" not in json.dumps(filled)


def test_sweep_families_match_family_experiments():
    """The dense_vs_moe family bundles reproduce experiments/<family>.yaml."""
    sweep = read_sweep(CONFIGS / "sweeps" / "dense_vs_moe.yaml")
    ignore = {"name", "output_dir", "description"}
    for family in ("report", "vqa", "grounding", "multitask"):
        run = f"{family}-dense-seed0"
        from_sweep = config_to_dict(sweep.load(run))
        from_file = config_to_dict(load_config(CONFIGS / "experiments" / f"{family}.yaml"))
        from_sweep["logging"]["group"] = None
        for key in ignore:
            from_sweep.pop(key), from_file.pop(key)
        assert from_sweep == from_file, family


# ----------------------------------------------------------------------------- inheritance
def test_base_inheritance_shipped():
    report = load_config(CONFIGS / "experiments" / "report.yaml")
    base = load_config(BASE)
    assert report.tasks.active() == ["report"] and report.eval.tasks == ["report"]
    assert report.train == base.train and report.model.preset == "tiny"
    assert report.output_dir == "runs/report"  # ${name} resolved after merging
    small = load_config(CONFIGS / "experiments" / "small_gpu.yaml")  # base: [list]
    assert small.model.preset == "small" and small.data.synthetic["image_size"] == 128
    assert small.tasks == load_config(CONFIGS / "experiments" / "multitask.yaml").tasks
    assert Path(small.deepspeed) == Path("configs/deepspeed/zero2_bf16.json") or Path(
        small.deepspeed).resolve() == (CONFIGS / "deepspeed" / "zero2_bf16.json").resolve()


def test_base_relative_to_file_and_nested_merge(tmp_path):
    write(tmp_path / "a" / "parent.yaml", "train: {lr: 0.01, steps: 40}\ndata: {n: 20}\n")
    child = write(tmp_path / "b" / "child.yaml",
                  "base: ../a/parent.yaml\ntrain: {steps: 50}\ntasks: {vqa: 0.0}\n")
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.steps, cfg.data.n) == (0.01, 50, 20)
    assert cfg.tasks.vqa == 0.0 and cfg.tasks.report == 1.0
    assert cfg.name == "child" and cfg.output_dir == "runs/child"


def test_a_mapping_of_another_kind_replaces_the_base_one(tmp_path):
    """``vision_config`` merges key by key within a kind; a new ``kind`` starts afresh (the
    ViT's keys would be invalid for a ConvNet), in a child file and on the command line."""
    write(tmp_path / "vit.yaml", "model:\n  overrides:\n    vision_config: "
          "{stem: conv, stem_channels: [8, 8, 16]}\n")
    same = write(tmp_path / "same.yaml", "base: vit.yaml\nmodel:\n  overrides:\n"
                 "    vision_config: {depth: 3}\n")
    assert load_config(same).model.overrides["vision_config"] == {
        "stem": "conv", "stem_channels": [8, 8, 16], "depth": 3}
    other = write(tmp_path / "cnn.yaml", "base: vit.yaml\nmodel:\n  overrides:\n"
                  "    vision_config: {kind: convnet, widths: [8, 16, 32], depths: [1, 1, 2]}\n")
    cfg = load_config(other)
    cnn = {"kind": "convnet", "widths": [8, 16, 32], "depths": [1, 1, 2]}
    assert cfg.model.overrides["vision_config"] == cnn
    assert cfg.model.build_config().vision_config == cnn
    cli = load_config(tmp_path / "vit.yaml", ["model.overrides.vision_config={kind: convnet, "
                                              "widths: [8, 16, 32], depths: [0, 1, 2]}"])
    assert cli.model.overrides["vision_config"] == {**cnn, "depths": [0, 1, 2]}
    # the ConvNet's layout is checked when the config loads (3 widths, 4 default depths)
    with pytest.raises(ConfigError, match=r"depths must be 3 ints .* got \[1, 1, 2, 2\]"):
        load_config(tmp_path / "vit.yaml",
                    ["model.overrides.vision_config={kind: convnet, widths: [8, 16, 32]}"])


def test_base_errors(tmp_path):
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "x.yaml")
    write(tmp_path / "z.yaml", "base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"z\.yaml: base.*missing\.yaml.*not found"):
        load_config(tmp_path / "z.yaml")


def test_dotlist_overrides():
    cfg = load_config(BASE, ["train.lr=0.02", "model.variant=moe_topk",
                             "model.overrides.moe_config.num_experts=8", "eval.tasks=[vqa]",
                             "tasks={report: 2.0}", "name=x", "data.synthetic.noise=0.5",
                             "train.group_by_length=true"])
    assert cfg.train.lr == 0.02 and cfg.model.variant == "moe_topk"
    assert cfg.train.group_by_length is True
    assert cfg.model.build_config().moe_config["num_experts"] == 8
    assert cfg.eval.tasks == ["vqa"] and cfg.tasks.report == 2.0 and cfg.tasks.vqa == 1.0
    assert cfg.output_dir == "runs/x" and cfg.data.synthetic_config().noise == 0.5


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "experiments" / "staged.yaml", ["model.variant=moe_shared"])
    again = load_config(save_config(cfg, tmp_path / "resolved.yaml"))
    assert again == cfg
    assert json.loads(json.dumps(config_to_dict(cfg))) == config_to_dict(cfg)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text, section, valid", [
    ("train: {lrr: 0.1}\n", "train", ["steps", "lr", "warmup", "stages"]),
    ("trian: {lr: 0.1}\n", "the top level", ["model", "data", "tasks", "train", "deepspeed"]),
    ("model: {overrides: {image_sise: 64}}\n", "model.overrides", ["image_size", "moe_config"]),
    ("data: {synthetic: {noize: 0.5}}\n", "data.synthetic", ["noise", "image_size"]),
    ("tasks: {captioning: 1.0}\n", "tasks", list(TASKS)),
    ("train: {stages: [{name: a, stepz: 3}]}\n", "train.stages[0]", ["steps", "trainable"]),
])
def test_unknown_key_in_file_lists_valid_keys(tmp_path, text, section, valid):
    path = write(tmp_path / "bad.yaml", "base: " + str(BASE) + "\n" + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "bad.yaml" in message and "unknown key" in message and section in message
    assert all(key in message for key in valid), message


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path / "parent.yaml", "eval: {tasks: [vqa], beams: 2}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml: unknown key 'beams'.*max_new_tokens"):
        load_config(child)


@pytest.mark.parametrize("override, pattern", [
    ("train.lrr=1", r"unknown key 'lrr' in section 'train'; valid keys: steps, lr"),
    ("tasks={vqa: 1, foo: 2}", r"unknown key 'foo' in section 'tasks'"),
    ("train.lr", r"not of the form key=value"),
])
def test_unknown_or_malformed_override(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(BASE, [override])


@pytest.mark.parametrize("overrides, pattern", [
    (["model.variant=moe_magic"], r"model\.variant must be one of dense, .*got 'moe_magic'"),
    (["model.preset=huge"], r"model\.preset must be one of tiny, small, got 'huge'"),
    (["train.lr=-0.001"], r"train\.lr must be a finite number > 0, got -0\.001"),
    (["train.lr=0"], r"train\.lr must be a finite number > 0"),
    (["data.source=disk", "data.path=/nonexistent/synth"],
     r"data\.path dataset '/nonexistent/synth' does not exist"),
    (["data.source=disk"], r"data\.path is required"),
    (["tasks.vqa=-1"], r"tasks\.vqa rate must be a finite number >= 0, got -1"),
    (["tasks={report: 0, vqa: 0, diagnosis: 0, segment: 0, detect: 0, measure: 0}"],
     r"tasks need at least one task with a positive rate"),
    (["eval.tasks=[report, summarise]"], r"eval\.tasks has unknown.*summarise"),
    (["train.steps=ten"], r"train\.steps must be int, got 'ten'"),
    (["train.steps=1.5"], r"train\.steps must be int"),
    (["train.resume=3"], r"train\.resume must be bool"),
    (["train.group_by_length=often"], r"train\.group_by_length must be bool"),
    (["train.pack_turns=often"], r"train\.pack_turns must be bool"),
    (["eval.report_samples=0"], r"eval\.report_samples must be an int >= 1, got 0"),
    (["eval.report_temperature=0"], r"eval\.report_temperature must be a finite number > 0"),
    (["eval.report_pool=test"], r"eval\.report_pool must be one of none, train, got 'test'"),
    (["eval.report_pool=train"], r"eval\.report_pool 'train' needs eval\.report_samples >= 2"),
    (["eval.measure=calipers"], r"eval\.measure must be one of keypoints, mask, got 'calipers'"),
    (["model.overrides.lm_loss_reduction=sum"], r"lm_loss_reduction must be one of token"),
    (["train.schedule=step"], r"train\.schedule must be one of cosine, linear, .*got 'step'"),
    (["logging.mode=cloud"], r"logging\.mode must be one of online, offline, .*got 'cloud'"),
    (["train.warmup=500"], r"train\.warmup \(500\) exceeds train\.steps"),
    (["data.synthetic.noise=2.0"], r"data\.synthetic is invalid: noise must be in \[0, 1\]"),
    (["deepspeed=nope.json"], r"deepspeed file 'nope\.json' does not exist"),
    (["model.overrides.moe_config.top_k=2"], r"model is invalid: variant 'dense' has no moe"),
    (["model.variant=moe_topk", "model.overrides.moe_config.num_expertz=2"],
     r"model is invalid: unknown moe_config keys \['num_expertz'\]"),
    (["train.stages=[{steps: 10}]"], r"train\.stages steps sum to 10, but train\.steps is 300"),
    (["train.stages=[{steps: null}, {steps: 5}]"], r"stages\[0\]\.steps may be null only"),
    (["name=a/b"], r"name must be a non-empty name without '/'"),
])
def test_bad_values_give_specific_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(BASE, overrides)
    assert "base.yaml" in str(info.value)


def test_bad_value_in_file_names_file_and_field(tmp_path):
    path = write(tmp_path / "neg.yaml", f"base: {BASE}\ntrain: {{lr: -1.0e-4}}\n")
    with pytest.raises(ConfigError, match=r"neg\.yaml: train\.lr must be a finite number > 0"):
        load_config(path)


def test_disk_dataset_split_names_checked(tmp_path):
    data = tmp_path / "synth"
    write(data / "dataset_dict.json", json.dumps({"splits": ["train", "validation", "test"]}))
    cfg = load_config(BASE, ["data.source=disk", f"data.path={data}"])
    assert cfg.data.path == str(data)
    with pytest.raises(ConfigError, match=r"data\.eval_split 'val' is not a split"):
        load_config(BASE, ["data.source=disk", f"data.path={data}", "data.eval_split=val"])


def test_task_rates_schema_matches_tasks():
    assert tuple(f.name for f in dataclasses.fields(TaskRates)) == TASKS


# ----------------------------------------------------------------------------- sweeps
def test_dense_vs_moe_expansion():
    runs = load_sweep(CONFIGS / "sweeps" / "dense_vs_moe.yaml")
    families = ("report", "vqa", "grounding", "multitask")
    variants = ("dense", *EQUAL_ACTIVE_VARIANTS)
    assert len(runs) == len(families) * len(variants) * 3 == 96
    expected = [f"{f}-{v}-seed{s}" for f in families for v in variants for s in range(3)]
    assert [name for name, _ in runs] == expected
    assert runs == load_sweep(CONFIGS / "sweeps" / "dense_vs_moe.yaml")  # deterministic
    name, overrides = runs[1]
    assert "model.variant=dense" in overrides and "train.seed=1" in overrides
    assert overrides[-3:] == [f"name={name}", f"output_dir=runs/sweeps/dense_vs_moe/{name}",
                              "logging.group=dense_vs_moe"]


def test_demo_sweep():
    sweep = read_sweep(CONFIGS / "sweeps" / "demo.yaml")
    assert [n for n, _ in sweep.runs] == [f"{v}-seed{s}" for v in ("dense", "moe_topk",
                                                                   "moe_region_soft",
                                                                   "dense_blind")
                                          for s in (0, 1, 2)]
    assert sweep.experiment.name == "demo.yaml"
    topk = sweep.load("moe_topk-seed0")
    assert topk.model.variant == "moe_topk"
    # the recipe of configs/experiments/demo.yaml
    assert (topk.data.n, topk.train.steps, topk.train.lr) == (2000, 1150, 3e-3)
    assert topk.train.pack_turns and topk.eval.report_samples == 8
    assert topk.tasks.report == 3.0 and topk.model.overrides["labels_only_logits"] is True
    assert topk.model.overrides["vision_config"] == {"kind": "convnet", "widths": [16, 32, 48],
                                                     "depths": [1, 1, 2]}
    assert topk.model.diagnosis_head
    blind, dense = sweep.load("dense_blind-seed1"), sweep.load("dense-seed1")
    assert blind.data.blind and not dense.data.blind
    blind, dense = config_to_dict(blind), config_to_dict(dense)
    for cfg in (blind, dense):
        cfg.pop("output_dir"), cfg.pop("name"), cfg["data"].pop("blind")
    assert blind == dense


def beside_the_demo(sweep_name: str):
    """``(run, demo config, sweep config)`` for each run of a sweep that varies ``demo.yaml``,
    as dicts without the keys that only say where a run goes (``output_dir``,
    ``logging.group``)."""
    demo = read_sweep(CONFIGS / "sweeps" / "demo.yaml")
    other = read_sweep(CONFIGS / "sweeps" / sweep_name)
    for run, _ in other.runs:
        pair = config_to_dict(demo.load(run)), config_to_dict(other.load(run))
        for cfg in pair:
            cfg.pop("output_dir"), cfg["logging"].pop("group")
        yield run, *pair


def test_demo_grouped_sweep_is_the_demo_with_length_grouping():
    runs = [run for run, _, _ in beside_the_demo("demo_grouped.yaml")]
    assert runs == ["dense-seed0", "moe_topk-seed0", "moe_region_soft-seed0"]
    for run, demo, grouped in beside_the_demo("demo_grouped.yaml"):
        assert demo["train"].pop("group_by_length") is False
        assert grouped["train"].pop("group_by_length") is True
        assert demo == grouped, run


def test_demo_bias_sweep_is_the_demo_with_bias_balancing():
    runs = [run for run, _, _ in beside_the_demo("demo_bias.yaml")]
    assert runs == [f"{v}-seed{s}" for v in ("moe_topk", "moe_region_soft") for s in (0, 1, 2)]
    for run, demo, bias in beside_the_demo("demo_bias.yaml"):
        assert bias["model"]["overrides"]["loss_weights"].pop("moe_balance") == 0.0
        assert bias["model"]["overrides"].pop("moe_config") == {"bias_update_rate": 0.001}
        assert demo == bias, run


def _pop_path(cfg: dict, path: tuple[str, ...]):
    for key in path[:-1]:
        cfg = cfg[key]
    return cfg.pop(path[-1])


def test_demo_ablations_change_one_factor_of_the_demo_dense_run():
    sweep = read_sweep(CONFIGS / "sweeps" / "demo_ablations.yaml")
    demo = read_sweep(CONFIGS / "sweeps" / "demo.yaml")
    changed = {
        "dense_vit-seed0": ("model", "overrides", "vision_config"),
        "dense_no_diag_head-seed0": ("model", "diagnosis_head"),
        "dense_unpacked-seed0": ("train", "pack_turns"),
        "dense_no_heatmap-seed0": ("model", "overrides", "loss_weights", "keypoint_heatmap"),
        "dense_dice_half-seed0": ("model", "overrides", "loss_weights", "seg_dice"),
    }
    assert [name for name, _ in sweep.runs] == list(changed)
    for run, path in changed.items():
        mine, base = (config_to_dict(c) for c in (sweep.load(run), demo.load("dense-seed0")))
        for cfg in (mine, base):
            cfg.pop("output_dir"), cfg.pop("name"), cfg["logging"].pop("group")
        assert _pop_path(mine, path) != _pop_path(base, path), run
        assert mine == base, run
    vit = sweep.load("dense_vit-seed0").model.build_config().vision_config
    assert vit == {"kind": "native", "patch_size": 8, "hidden_size": 48, "depth": 2,
                   "num_heads": 4, "stem": "conv", "stem_channels": [32, 32, 64]}


def test_demo_modality_sweep_is_the_demo_topk_run_with_modality_routing():
    demo = read_sweep(CONFIGS / "sweeps" / "demo.yaml")
    sweep = read_sweep(CONFIGS / "sweeps" / "demo_modality.yaml")
    variants = ("moe_modality", "moe_modality_region")
    assert [n for n, _ in sweep.runs] == [f"{v}-seed{s}" for v in variants for s in (0, 1, 2)]
    for run, _ in sweep.runs:
        variant, seed = run.split("-")
        mine, topk = (config_to_dict(c) for c in (sweep.load(run),
                                                    demo.load(f"moe_topk-{seed}")))
        assert mine["model"].pop("variant") == variant
        assert topk["model"].pop("variant") == "moe_topk"
        for cfg in (mine, topk):
            cfg.pop("output_dir"), cfg.pop("name"), cfg["logging"].pop("group")
        assert mine == topk, run


def test_sweep_validation(tmp_path):
    head = f"experiment: {BASE}\n"
    bad_key = write(tmp_path / "s1.yaml", head + "grid:\n  train.lrr: [0.1, 0.2]\n")
    with pytest.raises(ConfigError, match=r"s1\.yaml: grid\.train\.lrr.*unknown key 'lrr'"):
        read_sweep(bad_key)
    bad_bundle = write(tmp_path / "s2.yaml", head + "grid:\n  fam:\n    a: {tasks: {foo: 1}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'foo' in section 'tasks'"):
        read_sweep(bad_bundle)
    clash = write(tmp_path / "s3.yaml", head + "grid:\n  train.seed: [0]\n  x:\n"
                  "    a: {train.seed: 1}\n")
    with pytest.raises(ConfigError, match=r"'train\.seed' is also set by grid\.train\.seed"):
        read_sweep(clash)
    top = write(tmp_path / "s4.yaml", head + "grids: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'grids' in sweep; valid keys: name"):
        read_sweep(top)
    ok = write(tmp_path / "s5.yaml", head + "overrides: {train.steps: 20, train.warmup: 2}"
               "\ngrid:\n  train.lr: [0.001, 0.01]\n  data.synthetic.noise: [0.5]\n")
    runs = load_sweep(ok)
    assert [n for n, _ in runs] == ["lr0.001-noise0.5", "lr0.01-noise0.5"]
    cfg = read_sweep(ok).load("lr0.01-noise0.5")
    assert (cfg.train.lr, cfg.train.steps, cfg.data.synthetic["noise"]) == (0.01, 20, 0.5)


@pytest.mark.parametrize("value", ["dense", "1e-3", "null", "a b", "x: y", 1e-3, 3, True, None,
                                   [1, 2], {"a": [1, "b"]}, "runs/sweeps/x-y_z"])
def test_format_value_round_trips(value):
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"k={format_value(value)}"]))
    assert parsed["k"] == value and type(parsed["k"]) is type(value)


def test_cli(capsys):
    assert main([str(BASE), "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main([str(BASE), "train.lr=-1"]) == 1
    assert "train.lr must be a finite number > 0" in capsys.readouterr().err
