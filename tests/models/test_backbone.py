"""A pretrained HF VLM (Qwen2-VL, Qwen2.5-VL, LLaVA) from a local directory as echomoe's vision
encoder + projector + LM (echomoe.models.backbone, echomoe.vision.backbone).

Tiny random VLMs are built offline, saved with save_pretrained (with a tokenizer lacking the
echomoe tokens and the HF image processor's settings) and loaded back by path.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from echomoe.models import EchoMoEConfig, EchoMoEImageProcessor, build_config, build_processor
from echomoe.models.modeling import EchoMoEForConditionalGeneration
from echomoe.moe.builders import equal_active_expert_size

SIZE = 56  # 4 x 4 patches of 14: Qwen 2 x 2 merged tokens, LLaVA 16 tokens (cls dropped)
BACKBONES = ("qwen2_vl", "qwen2_5_vl", "llava")
TOKEN_TOL = 1e-5  # adapter + projector tokens vs the HF VLM's get_image_features
LOGIT_TOL = 1e-5  # decomposed LM vs the HF VLM, text-only logits


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with its own eos only (no <image>, [SEG], ..., no bos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(["a lesion in the left lobe of the thyroid"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _text(vocab: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
                eos_token_id=0, pad_token_id=0, **extra)


def _vlm(kind: str, vocab: int):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if kind == "qwen2_vl":  # tied embeddings, as Qwen2-VL-2B
        config = Qwen2VLConfig(text_config=_text(vocab, rope_parameters=rope),
                               vision_config=dict(depth=2, embed_dim=32, num_heads=2,
                                                  hidden_size=64),
                               image_token_id=vocab - 1, tie_word_embeddings=True)
        return Qwen2VLForConditionalGeneration(config), Qwen2VLImageProcessorPil()
    if kind == "qwen2_5_vl":  # windows of 2 x 2 merge blocks (from 112 px), block 1 full
        config = Qwen2_5_VLConfig(
            text_config=_text(vocab, rope_parameters=rope),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]),
            image_token_id=vocab - 1)
        return Qwen2_5_VLForConditionalGeneration(config), Qwen2VLImageProcessorPil()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=SIZE, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text(vocab)),
                         image_token_id=vocab - 1, image_seq_length=16)
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                      crop_size={"height": SIZE, "width": SIZE})
    return LlavaForConditionalGeneration(config), processor


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """``{kind: (directory, hf_vlm, hf_image_processor, tokenizer)}``."""
    out = {}
    for i, kind in enumerate(BACKBONES):
        torch.manual_seed(i)
        tokenizer = _tokenizer()
        vlm, image_processor = _vlm(kind, len(tokenizer))
        path = tmp_path_factory.mktemp(kind)
        vlm.save_pretrained(path)
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)
        out[kind] = (str(path), vlm.eval(), image_processor, tokenizer)
    return out


def _images(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def _model(path: str, variant: str = "dense", **overrides):
    config = build_config("tiny", variant, backbone={"path": path}, image_size=SIZE,
                          in_channels=3, **overrides)
    return EchoMoEForConditionalGeneration(config), build_processor(config=config)


def _hf_tokens(kind: str, vlm, image_processor, images) -> torch.Tensor:
    hf = image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        if kind == "llava":
            feats = vlm.model.get_image_features(
                pixel_values=hf["pixel_values"], vision_feature_layer=-2,
                vision_feature_select_strategy="default").pooler_output
        else:
            feats = vlm.model.get_image_features(pixel_values=hf["pixel_values"],
                                                 image_grid_thw=hf["image_grid_thw"]
                                                 ).pooler_output
    return torch.stack(list(feats)), hf


@pytest.mark.parametrize("kind", BACKBONES)
def test_adapter_tokens_equal_the_hf_vlm(vlms, kind):
    path, vlm, image_processor, _ = vlms[kind]
    model, processor = _model(path)
    images = _images()
    ref, hf = _hf_tokens(kind, vlm, image_processor, images)
    pixels = processor(images=images, text=["a", "b"])["pixel_values"][:, 0]  # (2, 3, S, S)
    if kind != "llava":  # the adapter's patchification is the image processor's
        flat, grid = model.vision.patchify(model.vision.normalise(pixels))
        assert grid.tolist() == hf["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
        assert (flat - hf["pixel_values"]).abs().max() <= 1e-6
    with torch.no_grad():
        tokens, maps = model.vision.forward_intermediates(pixels, 2)
        ours = model.projector(tokens)
    assert ours.shape == ref.shape == (2, model.tokens_per_image, 64)
    assert model.tokens_per_image == (4 if kind != "llava" else 16)
    assert (ours - ref).abs().max().item() <= TOKEN_TOL
    assert (ours - ref.flip(1)).abs().max().item() > 100 * TOKEN_TOL  # token order matters
    # grayscale (echomoe's default in_channels=1) == the HF processor on the image as RGB
    gray = Image.fromarray(images[0]).convert("L")
    one = EchoMoEImageProcessor(SIZE, 1).preprocess(gray, return_tensors="pt")["pixel_values"]
    ref_gray, _ = _hf_tokens(kind, vlm, image_processor, [np.asarray(gray.convert("RGB"))])
    with torch.no_grad():
        ours_gray = model.projector(model.vision.forward_features(one[:, 0]))
    assert one.shape[2] == 1 and (ours_gray - ref_gray).abs().max().item() <= TOKEN_TOL
    # the region classifier / pixel decoder read vision-dim features on the 4 x 4 patch grid
    assert tokens.shape[-1] == model.vision.hidden_size == 32 != model.vision.output_size
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 2
    if kind != "llava":  # the last map is the merger's input, un-permuted to row-major
        torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), tokens)
        # any multiple of 28 runs; at 112 px Qwen2.5-VL's windows really permute the tokens
        big = [np.kron(im, np.ones((2, 2, 1), dtype=np.uint8)) for im in images]
        ref_big, hf_big = _hf_tokens(kind, vlm, image_processor, big)
        pixels_big = torch.tensor(np.stack(big)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            ours_big = model.projector(model.vision.forward_features(pixels_big))
        assert ours_big.shape == ref_big.shape == (2, 16, 64)
        assert (ours_big - ref_big).abs().max().item() <= TOKEN_TOL
        order = model.vision._window_order(hf_big["image_grid_thw"])
        assert (order is None) == (kind == "qwen2_vl")
        assert order is None or not torch.equal(order, torch.arange(len(order)))


@pytest.mark.parametrize("kind", BACKBONES)
def test_decomposed_lm_text_logits_equal_the_hf_vlm(vlms, kind):
    path, vlm, _, tokenizer = vlms[kind]
    model, _ = _model(path)
    lm = model.language_model
    if kind != "llava":
        assert type(lm).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(1, len(tokenizer) - 1, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref = vlm(input_ids=ids, attention_mask=mask).logits
        ours = lm(input_ids=ids, attention_mask=mask).logits
    assert ours.shape[-1] == len(tokenizer) + 5  # + <s>, <image>, [SEG], [DET], [KPT]
    assert (ours[..., : ref.shape[-1]] - ref).abs().max().item() <= LOGIT_TOL


def test_config_from_the_backbone(vlms):
    path, vlm, _, tokenizer = vlms["qwen2_vl"]
    config = build_config("tiny", "moe_region_hard", backbone={"path": path}, image_size=SIZE)
    assert config.vision_config == {"kind": "backbone"} and config.backbone["path"] == path
    assert config.text_config.model_type == "qwen2" and config.text_config.tie_word_embeddings
    assert config.text_config.intermediate_size == 96  # the backbone LM's, not the preset's
    assert config.moe_config["intermediate_size"] == equal_active_expert_size(96, 2, 0, 0) == 48
    processor = build_processor(config=config)
    vocab = processor.tokenizer.get_vocab()
    assert config.image_token_id == vocab["<image>"] >= len(tokenizer)
    assert config.kpt_token_id == vocab["[KPT]"] and config.eos_token_id == vocab["<|endoftext|>"]
    assert config.text_config.vocab_size == len(processor.tokenizer) == len(tokenizer) + 5
    assert config.grounding_config["output_stride"] == 7 and not config.grounding_config[
        "image_stem"]
    assert config.backbone["image_mean"] == list(Qwen2VLImageProcessorPil.image_mean)
    with pytest.raises(ValueError, match="multiple of patch_size x spatial_merge_size"):
        build_config("tiny", backbone={"path": path}, image_size=42)
    with pytest.raises(ValueError, match="drop the override"):
        build_config("tiny", backbone={"path": path}, text_config={"hidden_size": 32})
    with pytest.raises(ValueError, match="unknown backbone keys"):
        build_config("tiny", backbone={"path": path, "revision": "main"})
    for bad in ({"path": str(shutil.os.path.join(path, "missing"))}, "Qwen/Qwen2-VL-2B"):
        with pytest.raises(FileNotFoundError, match="never downloads"):
            EchoMoEConfig(backbone=bad)
        with pytest.raises(FileNotFoundError, match="never downloads"):
            build_config("tiny", backbone=bad)


def _batch(processor, with_targets: bool = True) -> dict:
    prompts = ["<image>\nsegment the lesion [SEG] [DET] [KPT]", "<image>\nthe lobe [SEG] [DET]"]
    batch = dict(processor(images=_images(), text=prompts, regions=["thyroid", "breast"]))
    if with_targets:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[labels == processor.image_token_id] = -100
        g = torch.Generator().manual_seed(0)
        batch.update(labels=labels, masks=(torch.rand(2, SIZE, SIZE, generator=g) > 0.5).float(),
                     boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.4, 0.6, 0.3, 0.2]]),
                     keypoints=torch.rand(2, 4, 2, generator=g),
                     has_keypoints=torch.tensor([True, False]))
    return batch


@pytest.mark.parametrize("variant", ["dense", "moe_region_hard"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_forward_trains_every_part(vlms, kind, variant):
    model, processor = _model(vlms[kind][0], variant)
    out = model(**_batch(processor))
    expected = {"lm", "seg_bce", "seg_dice", "box_l1", "box_giou", "keypoint", "region_cls"}
    if variant != "dense":
        expected |= {"moe_balance", "moe_z"}
    assert expected <= set(out.losses) and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.pred_masks.shape == (2, SIZE, SIZE) and out.pred_keypoints.shape == (2, 4, 2)
    out.loss.backward()
    tower = model.vision.visual.blocks if kind != "llava" else \
        getattr(model.vision.tower, "vision_model", model.vision.tower).encoder.layers
    for module in (tower[0], model.projector, model.region_classifier, model.pixel_decoder):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads[:4]), type(module).__name__
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, type(module).__name__


@pytest.mark.parametrize("kind", BACKBONES)
def test_save_load_round_trip_and_generate(vlms, kind, tmp_path):
    source = tmp_path / "vlm"
    shutil.copytree(vlms[kind][0], source)
    model, processor = _model(str(source), "moe_region_hard")
    model.eval()
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["backbone"]["path"] is None and saved["backbone"]["config"]["model_type"] == kind
    assert model.config.backbone["path"] == str(source)
    shutil.rmtree(source)  # self-contained: the backbone directory is not needed any more
    loaded = EchoMoEForConditionalGeneration.from_pretrained(tmp_path / "run").eval()
    from echomoe.models import EchoMoEProcessor

    reloaded = EchoMoEProcessor.from_pretrained(tmp_path / "run")
    batch = _batch(processor, with_targets=False)
    assert torch.equal(reloaded(images=_images(), text=["<image>\nx", "<image>\ny"])["input_ids"],
                       processor(images=_images(), text=["<image>\nx", "<image>\ny"])["input_ids"])
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.pred_masks, a.pred_masks, rtol=0, atol=1e-6)
    if kind == "qwen2_vl":  # tied LM head survives the round trip
        lm = loaded.language_model
        assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    prompt = processor(images=_images(1), text="<image>\nDescribe")
    out = loaded.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and prompt["input_ids"].shape[1] < out.shape[1] <= \
        prompt["input_ids"].shape[1] + 3
    torch.testing.assert_close(out[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])


def test_experiment_yaml_trains_with_a_backbone(vlms, tmp_path):
    from echomoe.config import ConfigError, load_config
    from echomoe.data.synthetic.generate import generate
    from echomoe.train import MultiTaskBatches, train
    from echomoe.train.experiment import build_model_and_processor, make_collator

    shipped = "configs/experiments/backbone_qwen2vl.yaml"
    cfg = load_config(shipped)  # validates without the directory: it is read at build time
    assert cfg.model.backbone and cfg.model.variant == "moe_region_hard"
    path = vlms["qwen2_vl"][0]
    overrides = [f"model.backbone={path}", "model.overrides.image_size=56"]
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_config(shipped, [*overrides, f"model.tokenizer={path}"])
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(shipped, [f"model.backbone={path}", "model.overrides.image_size=42"])
    cfg = load_config(shipped, overrides)  # now the whole model section is checked
    model, processor = build_model_and_processor(cfg)
    assert model.config.backbone["path"] == path and model.config.moe_config["upcycle"]
    assert processor.tokenizer.convert_tokens_to_ids("[SEG]") == model.config.seg_token_id
    batches = MultiTaskBatches(generate(6, 0), collator=make_collator(model, processor),
                               rates=cfg.tasks.rates(), batch_size=3, seed=0)
    history = train(model, batches, steps=2, lr=1e-3, progress=False, handle_sigterm=False)
    assert len(history) == 2 and all(np.isfinite(row["loss"]) for row in history)


def test_plan_counts_a_backbone_model(vlms):
    from echomoe.models import count_parameters
    from echomoe.models.plan import plan

    model, _ = _model(vlms["qwen2_vl"][0], "moe_region_hard")
    planned = plan(model.config, gpus=2, zero=2)["parameters"]
    assert {k: planned[k] for k in ("total", "active", "router")} == count_parameters(model)
