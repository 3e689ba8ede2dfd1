"""Builders (presets x variants, equal active parameters) and the EchoMoEProcessor."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from echomoe.data.collate import VLMCollator
from echomoe.data.synthetic.generate import generate
from echomoe.data.tokenizer import SPECIAL_TOKENS
from echomoe.models import (
    EQUAL_ACTIVE_VARIANTS,
    PRESETS,
    VARIANTS,
    EchoMoEConfig,
    EchoMoEProcessor,
    build_config,
    build_processor,
    count_parameters,
    image_tokens_per_image,
    validate_config,
)
from echomoe.moe import moefy

MOE_VARIANTS = list(EQUAL_ACTIVE_VARIANTS)  # at dense's active FFN parameters


@pytest.fixture(scope="module")
def processor():
    return build_processor("tiny", num_samples=12)


@pytest.fixture(scope="module")
def images():
    return [s.images[0] for s in generate(3, seed=1)]


# ------------------------------------------------------------------------------ builders
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_config_builds_validates_and_round_trips(preset, variant):
    config = build_config(preset, variant)
    validate_config(config)
    assert (config.moe_config is None) == (variant == "dense")
    if config.moe_config is not None:
        assert config.moe_config["upcycle"] is False
        assert config.moe_config["num_regions"] == config.num_regions
    again = EchoMoEConfig.from_dict(json.loads(config.to_json_string()))
    assert again.moe_config == config.moe_config
    assert again.vision_config == config.vision_config
    assert again.text_config.intermediate_size == config.text_config.intermediate_size


def test_bad_names_list_valid_choices():
    with pytest.raises(ValueError, match="valid: tiny, small"):
        build_config("huge")
    with pytest.raises(ValueError, match="moe_region_hard"):
        build_config("tiny", "moe_everything")
    with pytest.raises(ValueError, match="projector_pool"):
        build_config("tiny", "dense", colour="blue")
    with pytest.raises(ValueError, match="unknown moe_config keys"):
        build_config("tiny", "moe_topk", moe_config={"experts": 8})
    with pytest.raises(ValueError, match="unknown vision_config keys"):
        build_config("tiny", vision_config={"width": 8})
    with pytest.raises(ValueError, match="unknown text_config keys"):
        build_config("tiny", text_config={"hiden_size": 8})
    with pytest.raises(ValueError, match="has no moe_config"):
        build_config("tiny", "dense", moe_config={"num_experts": 8})
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        build_config("tiny", image_size=36)
    # a ConvNet layout error surfaces when the config is made, not when the model is built
    with pytest.raises(ValueError, match=r"depths must be 3 ints >= 0 .* got \[1, 1\]"):
        build_config("tiny", vision_config={"kind": "convnet", "widths": [16, 32, 48],
                                            "depths": [1, 1]})
    with pytest.raises(ValueError, match="the last >= 1"):
        build_config("tiny", image_size=64, vision_config={"kind": "convnet", "widths": [8, 16],
                                                           "depths": [1, 0]})


def test_overrides_merge_and_keep_the_equal_active_rule():
    config = build_config("tiny", "moe_shared", moe_config={"num_experts": 8},
                          text_config={"intermediate_size": 256}, projector_pool=True)
    moe = config.moe_config
    assert (moe["num_experts"], moe["top_k"], moe["router"]) == (8, 2, "topk")
    assert moe["shared_expert_size"] == 64 and moe["intermediate_size"] == (256 - 64) // 2
    assert config.text_config.hidden_size == 64 and config.projector_pool
    assert build_config("tiny", "moe_topk", moe_config=None).moe_config is None
    fixed = build_config("tiny", "moe_topk", moe_config={"intermediate_size": 40})
    assert fixed.moe_config["intermediate_size"] == 40
    assert build_config("tiny", "moe_topk", regions=["a", "b"]).moe_config["num_regions"] == 2


def _lm_ffn_active(config):
    """``active - router`` parameters of the config's LM converted with ``moefy``."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config.text_config)
    if config.moe_config is not None:
        moefy(lm, **{**config.moe_config, "upcycle": False})
    counts = count_parameters(lm)
    return counts["active"] - counts["router"], counts


@pytest.mark.parametrize("preset", list(PRESETS))
def test_equal_active_parameters_dense_vs_moe(preset):
    dense, dense_counts = _lm_ffn_active(build_config(preset, "dense"))
    assert dense_counts["router"] == 0 and dense_counts["active"] == dense_counts["total"]
    for variant in MOE_VARIANTS:
        active, counts = _lm_ffn_active(build_config(preset, variant))
        assert active == dense, (preset, variant)
        assert counts["router"] > 0 and counts["total"] > counts["active"]


# ------------------------------------------------------------------------------ processor
def test_build_processor_trains_a_tokenizer_offline():
    start = time.perf_counter()
    proc = build_processor("tiny", num_samples=8)
    assert time.perf_counter() - start < 10
    tok = proc.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(7))  # pad bos eos <image> [SEG] [DET] [KPT]
    assert len(tok) <= build_config("tiny").text_config.vocab_size
    assert proc.image_tokens_per_image == (32 // 8) ** 2


def test_image_tokens_per_image_follows_the_config():
    assert image_tokens_per_image(build_config("tiny")) == 16
    assert image_tokens_per_image(build_config("tiny", projector_pool=True)) == 4
    assert image_tokens_per_image(build_config("small")) == 64


def test_tags_prepended_checked_and_expanded(processor, images):
    n_tok = processor.image_tokens_per_image
    out = processor(images=images[:2], text="Compare the two frames.")
    assert out["image_counts"].tolist() == [2]
    assert (out["input_ids"] == 3).sum().item() == 2 * n_tok
    assert out["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id
    tagged = processor(images=images[:2], text="<image><image>\nCompare the two frames.")
    assert torch.equal(tagged["input_ids"], out["input_ids"])
    with pytest.raises(ValueError, match=r"1 <image> tag\(s\) but 2 image\(s\).*expected 2"):
        processor(images=images[:2], text="<image>\nCompare.")
    with pytest.raises(ValueError, match=r"2 <image> tag\(s\) but 1 image\(s\)"):
        processor(images=[[images[0]], [images[1]]], text=["<image><image>a", "b"])
    with pytest.raises(ValueError, match="3 images for 2 texts"):
        processor(images=images, text=["a", "b"])
    text_only = processor(text="Hello")
    assert "pixel_values" not in text_only and (text_only["input_ids"] != 3).all()


def test_left_padding_pixels_and_regions(processor, images):
    out = processor(images=[[images[0]], images[1:3]], text=["Short.", "A longer prompt here."],
                    regions=["breast", "unknown"])
    ids, mask, pix = out["input_ids"], out["attention_mask"], out["pixel_values"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[:, -1].all() and mask[0, 0] == 0  # left padded: the short row starts with pads
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    first = mask[0].nonzero()[0].item()
    assert ids[0, first] == processor.tokenizer.bos_token_id and mask[0, first:].all()
    assert pix.shape == (2, 2, 1, 32, 32) and pix.dtype == torch.float32
    assert 0 <= pix.min() and pix.max() <= 1 and pix[0, 0].std() > 0
    assert (pix[0, 1] == 0).all()  # sample 0 has one image
    assert out["image_counts"].tolist() == [1, 2] and out["region_ids"].tolist() == [0, -1]
    right = processor(images=[[images[0]], images[1:3]], text=["Short.", "A longer prompt."],
                      padding_side="right")
    assert right["attention_mask"][:, 0].all()
    with pytest.raises(ValueError, match="unknown region 'lung'"):
        processor(images=images[0], text="x", regions="lung")


def test_image_inputs_pil_path_and_rgb(processor, images, tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(images[0]).save(path)
    rgb = np.repeat(images[0][..., None], 3, axis=-1)
    outs = [processor(images=im, text="x")["pixel_values"]
            for im in (images[0], Image.fromarray(images[0]), str(path), rgb)]
    for other in outs[1:]:
        assert torch.equal(outs[0], other)
    colour = EchoMoEProcessor.from_config(build_config("tiny", in_channels=3),
                                          processor.tokenizer)
    assert colour(images=rgb, text="x")["pixel_values"].shape == (1, 1, 3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        processor(images=images[0].astype(np.float32), text="x")
    with pytest.raises(ValueError, match="cannot read image"):
        processor(images=str(tmp_path / "missing.png"), text="x")


def test_prompt_tokens_match_the_training_collator(processor, images):
    collator = VLMCollator(processor.tokenizer, processor.image_tokens_per_image, 32)
    prompt = "<image>\nSegment the lesion.\n"
    train_ids, labels = collator.tokenize(prompt, "Here is the lesion: [SEG]", 1)
    infer_ids = processor(images=images[0], text=prompt)["input_ids"][0].tolist()
    assert train_ids[: len(infer_ids)] == infer_ids
    assert all(label == -100 for label in labels[: len(infer_ids)])


def test_save_load_round_trip_and_decode(processor, images, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = EchoMoEProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    a = processor(images=[images[0], images[1]], text=["Segment the lesion.", "Hi"])
    b = loaded(images=[images[0], images[1]], text=["Segment the lesion.", "Hi"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = processor.tokenizer.encode("Findings: a mass. [SEG]", add_special_tokens=False)
    assert processor.decode(ids) == "Findings: a mass. [SEG]"
    assert loaded.batch_decode([ids], skip_special_tokens=True) == ["Findings: a mass. "]
    with pytest.raises(FileNotFoundError, match="never downloads"):
        EchoMoEProcessor.from_pretrained(tmp_path / "nothing")


def test_auto_processor_loads_a_saved_processor(processor, images, tmp_path):
    from transformers import AutoProcessor

    import echomoe.models.modeling  # noqa: F401  (registers the auto classes)

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, EchoMoEProcessor) and loaded.to_dict() == processor.to_dict()
    a, b = processor(images=images[0], text="Hi"), loaded(images=images[0], text="Hi")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="unknown options \\['colour'\\]"):
        EchoMoEProcessor.from_pretrained(tmp_path, colour="red")


# ------------------------------------------------------------------------------ model smoke
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_build_model_forward_smoke(variant, processor, images):
    modeling = pytest.importorskip("echomoe.models.modeling")
    from echomoe.models import build_model

    model = build_model("tiny", variant)
    assert isinstance(model, modeling.EchoMoEForConditionalGeneration)
    inputs = processor(images=[images[0], images[1]], text=["Segment the lesion.", "Hi"],
                       regions=["breast", "unknown"])
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.logits).all()
    counts = count_parameters(model)
    dense = count_parameters(build_model("tiny", "dense"))
    if variant == "echovlm":  # the whole dense MLP plus a shared expert and 2 of 4 experts
        f = model.config.text_config.intermediate_size
        moe = model.config.moe_config
        extra = 2 * moe["top_k"] * 3 * 64 * moe["intermediate_size"] \
            + 2 * 3 * 64 * moe["shared_expert_size"]
        assert (moe["intermediate_size"], moe["shared_expert_size"], f) == (10, 38, 128)
        assert counts["active"] - counts["router"] == dense["active"] - dense["router"] + extra
        return
    assert counts["active"] - counts["router"] == dense["active"] - dense["router"]


def test_generate_from_processor_output(processor, images):
    pytest.importorskip("echomoe.models.modeling")
    from echomoe.models import build_model

    model = build_model("tiny", "moe_region_hard").eval()
    inputs = processor(images=[images[0], images[1]], text=["Write the report.\n", "Hi"],
                       regions="breast")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_processor_refuses_a_config_whose_pad_or_eos_ids_differ(processor):
    tok = processor.tokenizer
    config = build_config("tiny")
    config.eos_token_id = tok.eos_token_id + 100
    with pytest.raises(ValueError, match=r"eos_token: tokenizer 2, config 102"):
        EchoMoEProcessor.from_config(config, tok)
    config = build_config("tiny")
    config.pad_token_id = 5
    with pytest.raises(ValueError, match=r"pad_token: tokenizer 0, config 5"):
        EchoMoEProcessor.from_config(config, tok)
    assert build_config("tiny").eos_token_id == tok.eos_token_id == 2
