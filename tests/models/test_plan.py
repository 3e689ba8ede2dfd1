"""The run planner: exact parameter counts from the meta device, and ZeRO x EP memory."""

import json
import time

import pytest

from echomoe.cli import main
from echomoe.models import PRESETS, VARIANTS, build_config, build_model, count_parameters
from echomoe.models.plan import expert_parameters, model_memory, plan

QWEN2_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
              "tie_word_embeddings": True, "max_position_embeddings": 4096}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_planned_counts_equal_the_real_model(preset, variant):
    config = build_config(preset, variant)
    planned = plan(config)["parameters"]
    model = build_model(preset, variant)
    assert {k: planned[k] for k in ("total", "active", "router")} == count_parameters(model)
    assert planned["expert"] == expert_parameters(model)
    assert (planned["expert"] == 0) == (variant == "dense")


def test_memory_formula_by_zero_stage():
    # 1,000 dense parameters on 4 GPUs, bf16 + Adam: 2 + 2 + 12 bytes each
    figures = {z: model_memory(1000, 0, gpus=4, zero=z)["total"] for z in range(4)}
    assert figures == {0: 16000, 1: 4000 + 12000 / 4, 2: 2000 + 14000 / 4, 3: 16000 / 4}
    assert model_memory(1000, 0, dtype="fp32")["total"] == 16000
    # 800 expert parameters, 8 GPUs: ep=2 halves the experts a GPU holds (ZeRO-0)
    one = model_memory(0, 800, gpus=8, ep=1)["total"]
    assert model_memory(0, 800, gpus=8, ep=2, num_experts=4)["total"] == one / 2
    # ZeRO-2 shards expert gradients / states over the expert-data-parallel group (8 / 2)
    z2 = model_memory(0, 800, gpus=8, ep=2, zero=2)
    assert z2["weights"] == 2 * 400 and z2["optimizer"] == 12 * 400 / 4


@pytest.mark.parametrize("kwargs, field", [({"zero": 4}, "zero"), ({"gpus": 0}, "gpus"),
                                           ({"gpus": 6, "ep": 4}, "ep"),
                                           ({"gpus": 8, "ep": 8, "num_experts": 4}, "num_experts"),
                                           ({"dtype": "int8"}, "dtype")])
def test_bad_setups_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        model_memory(10, 10, **kwargs)


def test_a_qwen2_1_5b_size_plan_is_instant_and_counts_its_lm():
    start = time.perf_counter()
    result = plan(build_config("small", "dense", text_config=QWEN2_1_5B), gpus=8, zero=2)
    assert time.perf_counter() - start < 10
    assert result["parameters"]["language_model"] == 1_543_714_304  # Qwen2-1.5B's own count
    assert result["parameters"]["total"] > result["parameters"]["language_model"]
    moe = plan(build_config("small", "moe_topk", text_config=QWEN2_1_5B), gpus=8, zero=2, ep=4)
    assert moe["parameters"]["expert"] > 0
    assert moe["memory_bytes"]["total"] < plan(
        build_config("small", "moe_topk", text_config=QWEN2_1_5B), gpus=8, zero=2)[
        "memory_bytes"]["total"]


def test_cli_prints_the_plan(capsys):
    assert main(["info", "--plan", "--preset", "tiny", "--variant", "moe_region_hard",
                 "--gpus", "2", "--zero", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"parameters", "memory_bytes", "memory_gib", "setup"}
    assert out["parameters"] == plan(build_config("tiny", "moe_region_hard"), gpus=2,
                                     zero=1)["parameters"]
    assert out["setup"]["zero"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--text-config", "{hidden: 1}"], "--text-config is not valid JSON"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--zero", "5"], "zero must be 0, 1, 2 or 3"),
    (["--variant", "moe_topk", "--gpus", "6", "--ep", "4"], "ep=4 must divide gpus=6"),
])
def test_cli_plan_names_bad_input(capsys, argv, message):
    assert main(["info", "--plan", "--preset", "tiny", *argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
