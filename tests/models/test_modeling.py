"""The assembled VLM: forward, losses, gradients, save/load, generate, routing, bad input."""

import pytest
import torch

from echomoe.grounding import match_point_pairs
from echomoe.models.configuration import EchoMoEConfig
from echomoe.models.modeling import EchoMoEForConditionalGeneration

IMAGE = 3
SEG, DET, KPT = 4, 5, 6
VISION = {"kind": "native", "patch_size": 8, "hidden_size": 48, "depth": 2, "num_heads": 4}
MOE = {
    "dense": None,
    "topk": {"num_experts": 4, "top_k": 2, "upcycle": False, "intermediate_size": 64},
    "region_hard": {"num_experts": 4, "top_k": 1, "router": "region_hard", "upcycle": False,
                    "intermediate_size": 64,
                    "region_experts": [[0], [1], [2], [3], [0], [1], [2]]},
    "region_soft": {"num_experts": 4, "top_k": 2, "router": "region_soft", "upcycle": False,
                    "intermediate_size": 32},
    "dual_path": {"num_experts": 4, "top_k": 2, "upcycle": False, "intermediate_size": 32,
                  "dense_branch_size": 64},
}


def make_model(variant="topk", **overrides):
    torch.manual_seed(0)
    cfg = EchoMoEConfig(image_size=32, vision_config=VISION, moe_config=MOE[variant], **overrides)
    return EchoMoEForConditionalGeneration(cfg)


def batch(model, b=2, images=1):
    p = model.tokens_per_image
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(10, 500, (b, 6), generator=gen)
    ids = torch.cat([torch.full((b, p * images), IMAGE), text[:, :3],
                     torch.full((b, 1), SEG), torch.full((b, 1), DET), torch.full((b, 1), KPT),
                     text[:, 3:]], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.rand(b, images, 1, 32, 32, generator=gen),
        "region_ids": torch.arange(b) % 7,
        "labels": ids.masked_fill(ids == IMAGE, -100),
        "masks": (torch.rand(b, 32, 32, generator=gen) > 0.6).float(),
        "boxes": torch.rand(b, 4, generator=gen) * 0.4 + 0.3,
        "keypoints": torch.rand(b, 4, 2, generator=gen),
    }


@pytest.mark.parametrize("variant", list(MOE))
def test_forward_losses_and_gradients(variant):
    model = make_model(variant)
    inputs = batch(model)
    out = model(**inputs)
    expected = {"lm", "seg_bce", "seg_dice", "box_l1", "box_giou", "keypoint", "region_cls"}
    if variant != "dense":
        expected |= {"moe_balance", "moe_z"}
    assert expected <= set(out.losses)
    weights = model.config.loss_weights
    total = sum(weights[k] * v for k, v in out.losses.items())
    torch.testing.assert_close(out.loss, total)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert out.pred_masks.shape == (2, 32, 32) and out.pred_boxes.shape == (2, 4)
    assert out.pred_keypoints.shape == (2, 4, 2)
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_heatmap_heads_and_image_stem_train_and_ground():
    spatial = {"box_head": "heatmap", "keypoint_head": "heatmap", "image_stem": True}
    model = make_model("topk", grounding_config=spatial)
    inputs = batch(model)
    out = model(**inputs)
    assert {"box_l1", "box_giou", "keypoint"} <= set(out.losses)
    assert out.pred_boxes.shape == (2, 4) and out.pred_keypoints.shape == (2, 4, 2)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.pixel_decoder.image_stem[0][0].weight.grad.abs().sum() > 0
    grounded = model.ground(inputs["input_ids"], inputs["pixel_values"],
                            region_ids=inputs["region_ids"])
    torch.testing.assert_close(grounded["keypoints"], out.pred_keypoints.detach())
    with pytest.raises(ValueError, match="valid: mlp, heatmap"):
        make_model("dense", grounding_config={"box_head": "conv"})


def test_convnet_vision_trains_grounds_and_round_trips(tmp_path):
    """``vision_config kind: convnet`` feeds the projector, the region classifier and the pixel
    decoder like the ViT: every parameter learns, and the saved config rebuilds it."""
    from echomoe.models import build_model
    from echomoe.vision import ConvNet

    torch.manual_seed(0)
    model = build_model("tiny", "moe_region_soft", vision_config={
        "kind": "convnet", "widths": [12, 20, 40], "depths": [1, 0, 2], "kernel_size": 3})
    assert isinstance(model.vision, ConvNet) and model.vision.patch_size == 8
    assert model.config.vision_config == {"kind": "convnet", "widths": [12, 20, 40],
                                          "depths": [1, 0, 2], "kernel_size": 3}
    assert model.tokens_per_image == (32 // 8) ** 2
    inputs = batch(model)
    out = model(**inputs)
    assert {"lm", "seg_bce", "box_l1", "keypoint", "region_cls"} <= set(out.losses)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    model.save_pretrained(tmp_path)
    loaded = EchoMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    with pytest.raises(ValueError, match=r"unknown vision_config keys \['stem'\] for ConvNet"):
        build_model("tiny", vision_config={"kind": "convnet", "stem": "conv"})


def test_keypoint_heatmap_loss_is_off_by_default_and_weighted_when_on():
    model = make_model("topk")
    inputs = batch(model)
    assert "keypoint_heatmap" not in model(**inputs).losses  # weight 0: not even computed
    on = make_model("topk", loss_weights={"keypoint_heatmap": 0.5})
    out = on(**inputs)
    assert float(out.losses["keypoint_heatmap"].detach()) > 0
    total = sum(on.config.loss_weights[k] * v for k, v in out.losses.items())
    torch.testing.assert_close(out.loss, total)
    with pytest.raises(ValueError, match="keypoint_head='heatmap'"):
        make_model("topk", loss_weights={"keypoint_heatmap": 1.0},
                   grounding_config={"keypoint_head": "mlp"})


def test_keypoint_mask_leaves_missing_points_out_of_the_loss():
    model = make_model("topk")
    inputs = batch(model)
    full = model(**inputs).losses["keypoint"]
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    moved = {**inputs, "keypoints": inputs["keypoints"].clone()}
    moved["keypoints"][0, 2:] = 5.0  # padding where the mask is False: must not count
    masked = model(**moved, keypoint_mask=mask).losses["keypoint"]
    pred = model(**inputs).pred_keypoints.detach()
    pairs = model.config.grounding_config["measure_pairs"]
    target = match_point_pairs(pred, inputs["keypoints"], pairs, mask)
    want = (pred - target).abs()[mask].mean()
    torch.testing.assert_close(masked.detach(), want)
    assert not torch.isclose(masked, full)
    with pytest.raises(ValueError, match=r"keypoint_mask must be \(2, 4\)"):
        model(**inputs, keypoint_mask=mask[:, :2])


def test_caliper_pairs_are_matched_before_the_keypoint_losses():
    model = make_model("topk", loss_weights={"keypoint_heatmap": 1.0})
    fixed = make_model("topk", loss_weights={"keypoint_heatmap": 1.0},
                       grounding_config={"match_pairs": False})
    fixed.load_state_dict(model.state_dict())
    inputs = batch(model)
    pred = model(**inputs).pred_keypoints.detach()
    # Targets at the predictions with both pairs' ends swapped: matching swaps them back.
    swapped = {**inputs, "keypoints": pred[:, [1, 0, 3, 2]].clone()}
    matched = model(**swapped).losses
    assert float(matched["keypoint"]) == pytest.approx(0.0, abs=1e-6)
    assert float(fixed(**swapped).losses["keypoint"]) > 0.01
    in_order = model(**{**inputs, "keypoints": pred.clone()}).losses
    torch.testing.assert_close(matched["keypoint_heatmap"], in_order["keypoint_heatmap"])
    assert model.config.grounding_config["match_pairs"] is True  # the default


def test_diagnosis_classifier_learns_from_diagnosis_ids_and_round_trips(tmp_path):
    labels = ["normal", "birads_3", "tr4"]
    model = make_model("topk", diagnoses=labels)
    inputs = batch(model)
    ids = torch.tensor([2, -1])
    out = model(**inputs, diagnosis_ids=ids)
    assert out.diagnosis_logits.shape == (2, 3)
    want = torch.nn.functional.cross_entropy(out.diagnosis_logits[:1], ids[:1])
    torch.testing.assert_close(out.losses["diagnosis_cls"], want)
    total = sum(model.config.loss_weights[k] * v for k, v in out.losses.items())
    torch.testing.assert_close(out.loss, total)
    out.loss.backward()
    assert model.diagnosis_classifier.fc2.weight.grad.abs().sum() > 0
    assert model.vision.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert "diagnosis_cls" not in model(**inputs).losses  # no ids, no loss
    model.save_pretrained(tmp_path)
    loaded = EchoMoEForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.diagnoses == labels
    torch.testing.assert_close(loaded.diagnosis_classifier.fc2.weight,
                               model.diagnosis_classifier.fc2.weight)
    with pytest.raises(ValueError, match=r"diagnosis id 3 out of range for "
                                         r"len\(config.diagnoses\)=3"):
        model(**inputs, diagnosis_ids=torch.tensor([3, 0]))
    with pytest.raises(TypeError, match="diagnosis_ids must be an integer tensor"):
        model(**inputs, diagnosis_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"diagnosis_ids must have shape \(batch,\) = \(2,\)"):
        model(**inputs, diagnosis_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="the config has no diagnoses"):
        make_model("topk")(**inputs, diagnosis_ids=ids)
    assert make_model("topk").diagnosis_classifier is None
    for bad in ([], ["normal", "normal"], ["normal", ""]):
        with pytest.raises(ValueError, match="distinct non-empty label strings"):
            EchoMoEConfig(diagnoses=bad)


def test_several_images_per_sample():
    model = make_model("topk")
    inputs = batch(model, images=3)
    inputs["image_counts"] = torch.tensor([3, 2])
    p = model.tokens_per_image
    inputs["input_ids"][1, 2 * p:3 * p] = 11  # the second sample has two images only
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
    out = model(**inputs)
    assert torch.isfinite(out.loss)


def test_forward_rejects_unknown_keywords_with_a_suggestion():
    model = make_model("region_hard").eval()
    inputs = {k: batch(model)[k] for k in ("input_ids", "pixel_values")}
    with torch.no_grad():
        plain = model(**inputs).logits
        with pytest.raises(TypeError, match=r"'region_id' \(did you mean 'region_ids'\?\)"):
            model(**inputs, region_id=torch.tensor([1, 2]))
        with pytest.raises(TypeError, match="'colour'$"):
            model(**inputs, colour="red")
        # collator keys and transformers' flags pass, and a None is harmless
        same = model(**inputs, task_ids=torch.zeros(2), pixel_spacing=torch.ones(2),
                     return_dict=True, inputs_embeds=None).logits
    assert torch.equal(plain, same)


def test_an_empty_batch_is_refused_clearly():
    model = make_model("region_soft").eval()
    with pytest.raises(ValueError, match=r"non-empty \(batch, seq_len\) batch, got shape "
                                         r"\(0, 5\)"):
        model(input_ids=torch.zeros(0, 5, dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    model = make_model("region_hard").eval()
    inputs = {k: batch(model)[k] for k in ("input_ids", "pixel_values", "region_ids")}
    model.save_pretrained(tmp_path)
    loaded = EchoMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.pred_masks, b.pred_masks)
    assert (tmp_path / "model.safetensors").exists()


def test_generate_same_tokens_with_and_without_cache():
    model = make_model("dual_path").eval()
    p = model.tokens_per_image
    prompt = torch.cat([torch.full((2, p), IMAGE), torch.randint(10, 500, (2, 4))], dim=1)
    pixels = torch.rand(2, 1, 1, 32, 32)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, pixel_values=pixels, use_cache=True, **kwargs)
        plain = model.generate(input_ids=prompt, pixel_values=pixels, use_cache=False, **kwargs)
    assert cached.shape == (2, prompt.shape[1] + 6)
    assert torch.equal(cached, plain)


def test_cache_follows_transformers_name_and_continues_the_forward():
    """The cache is returned and taken under transformers' own name (``cache`` since 5.24,
    ``past_key_values`` before); one cached step gives the full forward's last logits."""
    from dataclasses import fields

    from transformers import Cache

    from echomoe.models.modeling import CACHE_NAME, EchoMoEOutput

    names = {f.name for f in fields(EchoMoEOutput)} & {"cache", "past_key_values"}
    assert names == {CACHE_NAME}
    model = make_model("topk").eval()
    p = model.tokens_per_image
    ids = torch.cat([torch.full((2, p), IMAGE), torch.randint(10, 500, (2, 5))], dim=1)
    pixels = torch.rand(2, 1, 1, 32, 32)
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixels, use_cache=False)
        prefix = model(input_ids=ids[:, :-1], pixel_values=pixels, use_cache=True)
        cache = prefix[CACHE_NAME]
        assert isinstance(cache, Cache) and cache.get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], use_cache=True, **{CACHE_NAME: cache})
    assert step[CACHE_NAME].get_seq_length() == ids.shape[1]
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids[:, -1:], cache=cache, past_key_values=cache)


def test_region_hard_routes_breast_tokens_to_breast_experts():
    model = make_model("region_hard").eval()
    inputs = batch(model)
    inputs["region_ids"] = torch.tensor([0, 5])  # breast -> expert 0; thyroid -> expert 1
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    region_ids=inputs["region_ids"])
    for info in out.routing.values():
        t = inputs["input_ids"].shape[1]
        assert set(info.expert_ids[:t].unique().tolist()) == {0}
        assert set(info.expert_ids[t:].unique().tolist()) == {1}


def test_predicted_region_routes_when_ids_are_omitted():
    model = make_model("region_hard").eval()
    inputs = batch(model)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    predicted = out.region_logits.argmax(-1)
    assert torch.equal(out.region_ids, predicted)
    info = next(iter(out.routing.values()))
    t = inputs["input_ids"].shape[1]
    assert torch.equal(info.region_ids, predicted.repeat_interleave(t))


def test_unknown_region_ids_are_replaced_by_the_prediction_per_sample():
    model = make_model("region_hard").eval()
    inputs = batch(model, b=3)
    given = torch.tensor([2, -1, -1])
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    region_ids=given)
    predicted = out.region_logits.argmax(-1)
    assert torch.equal(out.region_ids, torch.cat([given[:1], predicted[1:]]))
    assert (out.region_ids >= 0).all()
    model.config.predict_region = False
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    region_ids=given)
    assert torch.equal(out.region_ids, given)


def test_routes_by_region_names_region_routers_only():
    assert make_model("region_hard").routes_by_region
    assert make_model("region_soft").routes_by_region
    assert not make_model("topk").routes_by_region
    assert not make_model("dense").routes_by_region


def test_registered_with_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = make_model("topk")
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EchoMoEConfig)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, EchoMoEForConditionalGeneration)


def test_bad_inputs_raise_clear_errors():
    model = make_model("topk")
    inputs = batch(model)
    with pytest.raises(ValueError, match="channel"):
        model(**{**inputs, "pixel_values": torch.rand(2, 1, 2, 32, 32)})
    with pytest.raises(ValueError, match="32x32"):
        model(**{**inputs, "pixel_values": torch.rand(2, 1, 1, 40, 32)})
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(**{**inputs, "pixel_values": torch.rand(2, 32, 32)})
    no_seg = inputs["input_ids"].masked_fill(inputs["input_ids"] == SEG, 12)
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        model(**{**inputs, "input_ids": no_seg, "labels": None})
    with pytest.raises(ValueError, match="out of range"):
        model(**{**inputs, "region_ids": torch.tensor([0, 7])})
    short = inputs["input_ids"][:, 1:]
    with pytest.raises(ValueError, match="<image> tokens"):
        model(**{**inputs, "input_ids": short, "labels": None, "attention_mask": None})


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="valid: "):
        EchoMoEConfig(grounding_config={"pixel_dims": 8})
    with pytest.raises(ValueError, match="loss_weights"):
        EchoMoEConfig(loss_weights={"segbce": 1.0})
    with pytest.raises(ValueError, match="kind"):
        EchoMoEForConditionalGeneration(EchoMoEConfig(vision_config={"kind": "resnet"}))


def test_ground_turns_task_tokens_into_pixels():
    model = make_model("topk").eval()
    inputs = batch(model)
    seqs = inputs["input_ids"].clone()
    seqs[1][seqs[1] == KPT] = 12  # row 1 has no [KPT]
    result = model.ground(seqs, inputs["pixel_values"], original_sizes=torch.tensor([64, 48]),
                          pixel_spacing=torch.tensor([0.5, 0.5]))
    assert result["has_kpt"].tolist() == [True, False]
    assert result["masks"].dtype == torch.bool and result["masks"].shape == (2, 32, 32)
    cx, cy, w, h = result["boxes"][0].tolist()
    x0, y0, x1, y1 = result["boxes_xyxy"][0].tolist()
    assert x0 == pytest.approx((cx - w / 2) * 48, abs=1e-4)
    assert y1 == pytest.approx((cy + h / 2) * 64, abs=1e-4)
    pts = result["keypoints_px"][0]
    expected = torch.hypot(*(pts[1] - pts[0])) * 0.5
    assert result["measurements_mm"][0, 0].item() == pytest.approx(expected.item(), rel=1e-4)


def test_language_model_from_a_local_path(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ))
    lm.save_pretrained(tmp_path / "lm")
    cfg = EchoMoEConfig(image_size=32, vision_config=VISION, moe_config=MOE["topk"],
                        language_model_path=str(tmp_path / "lm"))
    model = EchoMoEForConditionalGeneration(cfg)
    ours = model.language_model.model.embed_tokens.weight
    torch.testing.assert_close(ours, lm.model.embed_tokens.weight)
    attn = model.language_model.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(attn, lm.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        EchoMoEConfig(language_model_path="Qwen/Qwen2-0.5B")
    model.save_pretrained(tmp_path / "vlm")  # self-contained: the LM directory is not needed
    import shutil

    shutil.rmtree(tmp_path / "lm")
    loaded = EchoMoEForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    assert loaded.config.language_model_path is None
    assert model.config.language_model_path == str(tmp_path / "lm")
    torch.testing.assert_close(loaded.language_model.model.embed_tokens.weight, ours)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_every_preset_and_variant_trains(preset):
    from echomoe.models import VARIANTS, build_model

    for variant in VARIANTS:
        model = build_model(preset, variant)
        size, p = model.config.image_size, model.tokens_per_image
        ids = torch.cat([torch.full((2, p), IMAGE), torch.randint(10, 200, (2, 3)),
                         torch.tensor([[SEG, DET, KPT]] * 2)], dim=1)
        out = model(input_ids=ids, pixel_values=torch.rand(2, 1, 1, size, size),
                    region_ids=torch.tensor([0, 6]), labels=ids.masked_fill(ids == IMAGE, -100),
                    masks=(torch.rand(2, size, size) > 0.5).float(), boxes=torch.rand(2, 4),
                    keypoints=torch.rand(2, 4, 2))
        assert torch.isfinite(out.loss), variant
        assert out.logits.shape == (2, ids.shape[1], model.config.text_config.vocab_size)
        out.loss.backward()
        missing = [n for n, q in model.named_parameters() if q.requires_grad and q.grad is None]
        assert missing == [], (preset, variant, missing)


def test_right_padding_does_not_change_the_moe_losses():
    model = make_model("topk").eval()
    inputs = batch(model)
    ids = inputs["input_ids"]
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
    labels = padded.masked_fill(mask == 0, -100)
    with torch.no_grad():  # labels make the forward supervised: aux losses are computed
        plain = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                      region_ids=inputs["region_ids"], labels=ids)
        pad = model(input_ids=padded, attention_mask=mask, pixel_values=inputs["pixel_values"],
                    region_ids=inputs["region_ids"], labels=labels)
    for name in ("moe_balance", "moe_z"):
        torch.testing.assert_close(pad.losses[name], plain.losses[name], msg=name)


def test_inference_forwards_skip_the_moe_aux_losses_but_not_the_routing():
    model = make_model("region_soft").eval()
    inputs = batch(model)
    kwargs = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
              "region_ids": inputs["region_ids"]}
    with torch.no_grad():
        inference = model(**kwargs)  # what each generate() step is
        evaluation = model(**kwargs, labels=inputs["input_ids"])
    with_grad = model(**kwargs)
    moe_keys = {"moe_balance", "moe_z", "moe_region"}
    assert not moe_keys & set(inference.losses)
    assert moe_keys <= set(evaluation.losses) and moe_keys <= set(with_grad.losses)
    torch.testing.assert_close(inference.logits, evaluation.logits)
    assert inference.routing.keys() == evaluation.routing.keys()
    for name, info in inference.routing.items():
        assert torch.equal(info.expert_ids, evaluation.routing[name].expert_ids)
