"""Tokenizer, task builders / sampler and the VLM collator (tiny, offline, CPU)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from echomoe.data.collate import IGNORE_INDEX, TaskTransform, VLMCollator
from echomoe.data.schema import UltrasoundSample, UnknownRegionError, to_hf_dataset
from echomoe.data.tasks import (
    PROMPTS,
    TASKS,
    TaskSampler,
    build_task,
    primary_box,
    primary_mask_name,
    supported_tasks,
)
from echomoe.data.tokenizer import (
    DET_TOKEN,
    EOS_TOKEN,
    EXTRA_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    KPT_TOKEN,
    SEG_TOKEN,
    SPECIAL_TOKENS,
    add_special_tokens_to,
    load_tokenizer,
    train_tokenizer,
)

H, W = 20, 24  # original key-frame size (uneven on purpose)


def full_sample(sid: str = "full", region: str = "thyroid") -> UltrasoundSample:
    """Two images; lesion mask, box, 4 caliper points, sizes, report, 2 QA, diagnosis."""
    rng = np.random.default_rng(0)
    mask = np.zeros((H, W), bool)
    mask[2:10, 4:12] = True  # rows 2..9, cols 4..11
    return UltrasoundSample(
        id=sid,
        images=[rng.integers(0, 256, (H, W), dtype=np.uint8),
                rng.integers(0, 256, (16, 18), dtype=np.uint8)],
        region=region,
        pixel_spacing=0.1,
        masks={"organ": np.ones((H, W), bool), "lesion": mask},
        boxes=[{"label": "organ", "bbox": [0, 0, W - 1, H - 1]},
               {"label": "lesion", "bbox": [4, 2, 11, 9]}],
        keypoints={"long_a": (4.0, 5.0), "long_b": (11.0, 5.0),
                   "short_a": (8.0, 2.0), "short_b": (8.0, 9.0)},
        attributes={"lesion_present": True, "lesion_type": "nodule",
                    "size_long_mm": 12.3, "size_short_mm": 8.1},
        findings="A hypoechoic nodule with an irregular margin.",
        impression="TI-RADS 4.",
        qa=[{"question": "Is there a nodule?", "answer": "yes", "type": "yes/no"},
            {"question": "What is the echogenicity?", "answer": "hypoechoic", "type": "open"}],
        diagnosis="suspicious",
        source="test",
    )


def bare_sample(sid: str = "bare") -> UltrasoundSample:
    """One 16x16 image, an empty lesion mask, one keypoint, a report only; unknown region."""
    return UltrasoundSample(
        id=sid,
        images=[np.full((16, 16), 128, np.uint8)],
        masks={"lesion": np.zeros((16, 16), bool)},
        boxes=[{"label": "lesion", "bbox": [5, 5, 2, 2]}],  # invalid (max < min)
        keypoints={"p": (1.0, 1.0)},
        findings="Normal study.",
    )


def corpus() -> list[str]:
    texts = []
    for s in (full_sample(), bare_sample()):
        texts += [s.report, *(q["question"] for q in s.qa), *(q["answer"] for q in s.qa)]
    for phrasings in PROMPTS.values():
        texts += list(phrasings)
    texts += ["Here is the nodule:", "The nodule is here:", "Calipers on the nodule:",
              "It measures 12.3 x 8.1 mm."]
    return texts * 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(), vocab_size=400, min_frequency=1)


@pytest.fixture()
def collator(tokenizer):
    return VLMCollator(tokenizer, image_tokens_per_image=5, image_size=16)


# ------------------------------------------------------------------------------- tokenizer
def test_special_tokens_are_single_ids_and_round_trip(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(7))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for token, expected in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [expected]
    text = f"{IMAGE_TOKEN}{IMAGE_TOKEN}\nSegment it. Here: {SEG_TOKEN}{DET_TOKEN} {KPT_TOKEN}"
    enc = tokenizer.encode(text, add_special_tokens=False)
    assert enc[:2] == [3, 3] and enc.count(4) == enc.count(5) == enc.count(6) == 1
    for t in ["The nodule measures 12.3 x 8.1 mm.", "unseen: µm, é, 日本, tabs\tand  spaces", text]:
        assert tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) == t
    assert tokenizer("nodule").input_ids[0] == tokenizer.bos_token_id  # bos, no eos
    assert tokenizer("nodule").input_ids[-1] != tokenizer.eos_token_id


def test_tokenizer_deterministic_and_validated(tokenizer):
    again = train_tokenizer(corpus(), vocab_size=400, min_frequency=1)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus(), vocab_size=100)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_tokenizer(["a", 3], vocab_size=300)


def test_save_load_equal(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == len(tokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.all_special_tokens == tokenizer.all_special_tokens
    for t in corpus()[:10] + [f"{IMAGE_TOKEN}\nMeasure. {KPT_TOKEN}"]:
        assert loaded(t).input_ids == tokenizer(t).input_ids
    assert add_special_tokens_to(loaded) == 0  # already complete
    assert load_tokenizer(tmp_path / "tok").get_vocab() == tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer(tmp_path / "Qwen/Qwen2-0.5B")


def test_add_special_tokens_to_other_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(corpus(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                            extra_special_tokens=["<|im_start|>"]).save_pretrained(tmp_path)
    other = AutoTokenizer.from_pretrained(str(tmp_path))
    before_len, before_ids = len(other), other.encode("a nodule", add_special_tokens=False)
    assert other.pad_token is None and other.bos_token is None
    assert other.encode(SEG_TOKEN, add_special_tokens=False) != [before_len]

    added = add_special_tokens_to(other)
    assert added == 6 and len(other) == before_len + 6  # pad, bos + 4 echomoe tokens
    assert other.eos_token == "<|endoftext|>"  # the pretrained eos is kept
    assert (other.pad_token, other.bos_token) == ("<pad>", "<s>")
    assert "<|im_start|>" in other.extra_special_tokens  # existing extras kept
    for token in EXTRA_SPECIAL_TOKENS:
        (tid,) = other.encode(token, add_special_tokens=False)
        assert tid >= before_len
    assert other.encode("a nodule", add_special_tokens=False) == before_ids
    assert add_special_tokens_to(other) == 0
    # and the collator works with it
    batch = VLMCollator(other, 3, 8)([{"sample": bare_sample(), "target": "Normal.",
                                       "prompt": f"{IMAGE_TOKEN}\nReport.\n"}])
    sup = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert other.decode(sup) == "Normal.<|endoftext|>"


# ------------------------------------------------------------------------------- tasks
def test_every_builder_on_full_sample():
    s, rng = full_sample(), np.random.default_rng(0)
    out = {task: build_task(task, s, rng) for task in TASKS}
    for task, pairs in out.items():
        assert pairs, task
        for prompt, _ in pairs:
            assert prompt.startswith(f"{IMAGE_TOKEN}{IMAGE_TOKEN}\n") and prompt.endswith("\n")
            assert prompt.count(IMAGE_TOKEN) == 2
    assert out["report"] == [(out["report"][0][0], s.report)]
    assert s.report == ("Findings: A hypoechoic nodule with an irregular margin. "
                        "Impression: TI-RADS 4.")
    assert [t for _, t in out["vqa"]] == ["yes", "hypoechoic"]
    assert "Is there a nodule?" in out["vqa"][0][0]
    assert out["diagnosis"][0][1] == "suspicious"
    assert out["segment"][0][1] == f"Here is the nodule: {SEG_TOKEN}"
    assert "nodule" in out["segment"][0][0]
    assert out["detect"][0][1] == f"The nodule is here: {DET_TOKEN}"
    assert out["measure"][0][1] == (f"Calipers on the nodule: {KPT_TOKEN}. "
                                    "It measures 12.3 x 8.1 mm.")
    assert primary_mask_name(s) == "lesion" and primary_box(s)["bbox"] == [4, 2, 11, 9]
    assert supported_tasks(s) == TASKS


def test_unsupported_tasks_are_skipped():
    s, rng = bare_sample(), np.random.default_rng(0)
    for task in ("vqa", "diagnosis", "segment", "detect", "measure"):
        assert build_task(task, s, rng) == [], task
    assert supported_tasks(s) == ("report",)
    # no size attribute -> the measure target has the token but no invented number
    s.keypoints = {"a": (1.0, 1.0), "b": (3.0, 4.0)}
    assert build_task("measure", s, rng)[0][1] == f"Calipers on the lesion: {KPT_TOKEN}."
    s.attributes = {"head_circumference_mm": 170.25}
    s.masks["head"] = np.ones((16, 16), bool)
    assert build_task("measure", s, rng)[0][1] == (
        f"Calipers on the head: {KPT_TOKEN}. The head circumference is 170.2 mm.")
    s.attributes, s.masks = {}, {"lesion": np.zeros((16, 16), bool)}
    # an empty lesion mask falls back to a non-empty organ mask, never to an empty one
    s.masks["organ"] = np.ones((16, 16), bool)
    assert primary_mask_name(s) == "organ"
    assert build_task("segment", s, rng)[0][1] == f"Here is the organ: {SEG_TOKEN}"
    with pytest.raises(ValueError, match="valid tasks: report, vqa"):
        build_task("caption", s, rng)


def test_prompt_variety_and_determinism():
    s = full_sample()
    for task in TASKS:
        a = [build_task(task, s, np.random.default_rng(i))[0][0] for i in range(40)]
        b = [build_task(task, s, np.random.default_rng(i))[0][0] for i in range(40)]
        assert a == b
        assert len(set(a)) >= 3, task


def test_sampler_rates_statistics():
    rates = {"report": 1.0, "vqa": 2.0, "segment": 1.0, "detect": 0.0}
    sampler, s = TaskSampler(rates, seed=0), full_sample()
    n = 3000
    counts = {t: 0 for t in TASKS}
    for _ in range(n):
        counts[sampler(s).task] += 1
    assert counts["detect"] == counts["diagnosis"] == counts["measure"] == 0
    for task, p in (("report", 0.25), ("vqa", 0.5), ("segment", 0.25)):
        assert abs(counts[task] / n - p) < 0.03, (task, counts)
    # only supported tasks are drawn; nothing supported -> None
    assert {sampler(bare_sample()).task for _ in range(50)} == {"report"}
    assert TaskSampler({"segment": 1.0})(bare_sample()) is None
    # same seed -> same stream; keyed draws do not depend on call order
    a, b = TaskSampler(rates, seed=3), TaskSampler(rates, seed=3)
    assert [a(s) for _ in range(20)] == [b(s) for _ in range(20)]
    assert a(s, key=(0, 7)) == b(s, key=(0, 7))
    assert len({a(s, key=(0, i)) for i in range(30)}) > 3


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"'caption'.*valid tasks: report, vqa, diagnosis"):
        TaskSampler({"report": 1.0, "caption": 1.0}, seed=0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        TaskSampler({"report": -1.0})
    with pytest.raises(ValueError, match="positive rate"):
        TaskSampler({"report": 0.0})


# ------------------------------------------------------------------------------- collator
def items(tasks=("segment", "report")):
    s_full, s_bare = full_sample(), bare_sample()
    rng = np.random.default_rng(0)
    p_full, t_full = build_task(tasks[0], s_full, rng)[0]
    p_bare, t_bare = build_task(tasks[1], s_bare, rng)[0]
    return [{"sample": s_full, "prompt": p_full, "target": t_full, "task": tasks[0]},
            {"sample": s_bare, "prompt": p_bare, "target": t_bare, "task": tasks[1]}]


def test_collator_shapes_and_label_masking(tokenizer, collator):
    feats = items()
    batch = collator(feats)
    b, length = batch["input_ids"].shape
    assert b == 2 and batch["labels"].shape == batch["attention_mask"].shape == (2, length)
    assert batch["pixel_values"].shape == (2, 2, 1, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert 0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    assert batch["image_counts"].tolist() == [2, 1]
    assert batch["pixel_values"][1, 1].abs().sum() == 0  # no second image for the bare sample
    assert torch.allclose(batch["pixel_values"][1, 0], torch.full((1, 16, 16), 128 / 255))
    assert batch["masks"].shape == (2, 16, 16) and batch["boxes"].shape == (2, 4)
    assert batch["keypoints"].shape == (2, 4, 2)
    assert batch["task_ids"].tolist() == [TASKS.index("segment"), TASKS.index("report")]

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [2 * 5, 1 * 5]
    for i, f in enumerate(feats):
        ids, labels, att = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        n = int(att.sum())
        assert att[:n].all() and not att[n:].any()
        assert ids[0] == tokenizer.bos_token_id
        assert (ids[n:] == tokenizer.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all()
        supervised = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(supervised.tolist()) == f["target"] + EOS_TOKEN
        # supervised positions are exactly the last tokens of the sequence, equal to the inputs
        k = len(supervised)
        assert (labels[n - k:n] == ids[n - k:n]).all() and (labels[:n - k] == IGNORE_INDEX).all()
        prompt = tokenizer.decode(ids[1:n - k].tolist())
        assert prompt == f["prompt"].replace(IMAGE_TOKEN, IMAGE_TOKEN * 5)


def test_collator_grounding_labels(tokenizer):
    # original size, so pixels / masks are exact
    collator = VLMCollator(tokenizer, 2, (H, W), keypoint_names=("long_a", "long_b"))
    s = full_sample()
    feats = [{"sample": s, "prompt": f"{IMAGE_TOKEN * 2}\nx\n", "task": None,
              "target": f"{SEG_TOKEN} {DET_TOKEN} {KPT_TOKEN}"},
             {"sample": full_sample("r", region="heart"), "prompt": f"{IMAGE_TOKEN * 2}\nx\n",
              "target": "no task token"},
             {"sample": bare_sample(), "prompt": f"{IMAGE_TOKEN}\nx\n",
              "target": f"{SEG_TOKEN} {DET_TOKEN} {KPT_TOKEN}"}]
    batch = collator(feats)
    assert batch["pixel_values"].shape == (3, 2, 1, H, W)
    assert torch.equal(batch["pixel_values"][0, 0, 0],
                       torch.from_numpy(s.images[0].astype(np.float32) / 255))
    assert torch.equal(batch["masks"][0], torch.from_numpy(s.masks["lesion"]).float())
    assert batch["has_mask"].tolist() == [True, False, False]  # no [SEG] / empty mask
    assert batch["has_box"].tolist() == [True, False, False]  # no [DET] / invalid box
    assert batch["has_keypoints"].tolist() == [True, False, False]  # no [KPT] / missing names
    assert batch["masks"][1:].abs().sum() == 0 and batch["boxes"][1:].abs().sum() == 0
    # bbox (4, 2, 11, 9) inclusive in a 20 x 24 image
    assert torch.allclose(batch["boxes"][0], torch.tensor([16 / 48, 12 / 40, 8 / 24, 8 / 20]))
    assert torch.allclose(batch["keypoints"][0],
                          torch.tensor([[4.5 / W, 5.5 / H], [11.5 / W, 5.5 / H]]))
    assert batch["region_ids"].tolist() == [5, 2, -1]  # thyroid, heart, unknown
    assert batch["task_ids"].tolist() == [-1, -1, -1]
    assert batch["pixel_spacing"][:2].tolist() == pytest.approx([0.1, 0.1])
    assert math.isnan(batch["pixel_spacing"][2])
    assert batch["original_sizes"].tolist() == [[H, W], [H, W], [16, 16]]
    # a length in mm from normalised keypoints: 7 px x 0.1 mm
    d = (batch["keypoints"][0, 1] - batch["keypoints"][0, 0]) * torch.tensor([W, H])
    assert float(d.norm() * batch["pixel_spacing"][0]) == pytest.approx(0.7)
    assert batch["keypoint_mask"].tolist() == [[True, True], [False, False], [False, False]]
    # resized masks stay binary
    small = VLMCollator(tokenizer, 2, 8)(feats[:1])
    assert set(small["masks"].unique().tolist()) <= {0.0, 1.0} and small["masks"].sum() > 0


def test_collator_supervises_the_points_a_sample_has(tokenizer):
    """With ``num_keypoints`` a sample with fewer points (a 2-point LV diameter among 4-point
    calipers) keeps its points, flagged in ``keypoint_mask``; one with none has no label."""
    target = f"{KPT_TOKEN}"
    two = full_sample("two")  # long_a, long_b and whatever else it has
    two.keypoints = {"a": (4.0, 5.0), "b": (11.0, 5.0)}
    four = full_sample("four")
    four.keypoints = {f"p{i}": (float(i), 2.0 * i) for i in range(5)}
    none = full_sample("none")
    none.keypoints = {}
    feats = [{"sample": s, "prompt": f"{IMAGE_TOKEN * 2}\nx\n", "target": target}
             for s in (two, four, none)]
    batch = VLMCollator(tokenizer, 2, (H, W), num_keypoints=4)(feats)
    assert batch["has_keypoints"].tolist() == [True, True, False]
    assert batch["keypoint_mask"].tolist() == [[True, True, False, False], [True] * 4,
                                               [False] * 4]
    assert torch.allclose(batch["keypoints"][0, :2],
                          torch.tensor([[4.5 / W, 5.5 / H], [11.5 / W, 5.5 / H]]))
    assert batch["keypoints"][0, 2:].abs().sum() == 0 and batch["keypoints"][2].abs().sum() == 0
    assert torch.allclose(batch["keypoints"][1, 3], torch.tensor([3.5 / W, 6.5 / H]))


def test_collator_diagnosis_ids_for_every_row_of_a_diagnosed_image(tokenizer):
    feats = [{"sample": s, "prompt": f"{IMAGE_TOKEN * 2}\nx\n", "target": "t"}
             for s in (full_sample("a"), full_sample("b"), full_sample("c"))]
    feats[0]["sample"].diagnosis = "tr4"
    feats[1]["sample"].diagnosis = None
    feats[2]["sample"].diagnosis = "normal"
    batch = VLMCollator(tokenizer, 2, (H, W), diagnoses=("normal", "tr2", "tr4"))(feats)
    assert batch["diagnosis_ids"].tolist() == [2, -1, 0]
    assert "diagnosis_ids" not in VLMCollator(tokenizer, 2, (H, W))(feats)
    with pytest.raises(ValueError, match=r"sample 'a': diagnosis 'tr4' is not one of the "
                                         r"model's diagnoses \(normal, tr2\)"):
        VLMCollator(tokenizer, 2, (H, W), diagnoses=("normal", "tr2"))(feats)


def test_collator_errors_and_truncation(tokenizer):
    f = items()[1]
    with pytest.raises(ValueError, match=r"'bare'.*2 <image> token\(s\) but the sample has 1"):
        VLMCollator(tokenizer, 4, 16)([{**f, "prompt": IMAGE_TOKEN + f["prompt"]}])
    with pytest.raises(ValueError, match="no room for the target"):
        VLMCollator(tokenizer, 4, 16, max_length=5)([f])
    with pytest.raises(KeyError, match="lacks"):
        VLMCollator(tokenizer, 4, 16)([{"sample": f["sample"]}])
    bad = bare_sample()
    bad.region = "lung"
    with pytest.raises(UnknownRegionError):
        VLMCollator(tokenizer, 4, 16)([{**f, "sample": bad}])
    full = VLMCollator(tokenizer, 4, 16)([f])
    n_prompt = int((full["labels"][0] == IGNORE_INDEX).sum())
    cut = VLMCollator(tokenizer, 4, 16, max_length=n_prompt + 3)([f])
    assert cut["input_ids"].shape == (1, n_prompt + 3)
    assert torch.equal(cut["labels"][0], full["labels"][0, : n_prompt + 3])
    with pytest.raises(ValueError, match="valid tasks"):
        VLMCollator(tokenizer, 4, 16)([{**f, "task": "caption"}])


def test_with_transform_and_dataloader_workers(tokenizer, collator, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    samples = [full_sample(f"f{i}", region=("thyroid", "liver")[i % 2]) for i in range(6)]
    samples += [bare_sample("b0"), bare_sample("b1")]
    ds = to_hf_dataset(samples)
    transform = TaskTransform(TaskSampler({t: 1.0 for t in TASKS}, seed=0))
    view = ds.with_transform(transform)
    row = view[0]
    assert set(row) == {"sample", "task", "prompt", "target"}
    assert row["sample"].id == "f0" and row["task"] in TASKS
    assert view[6]["task"] == "report"  # the bare sample supports only report
    def text(i):
        return tuple(view[i][k] for k in ("task", "prompt", "target"))

    assert text(0) == text(0)  # keyed by (epoch, sample id): stable

    restored = pickle.loads(pickle.dumps(collator))
    assert torch.equal(restored([row])["input_ids"], collator([row])["input_ids"])
    pickle.loads(pickle.dumps(transform))

    def run(workers):
        loader = torch.utils.data.DataLoader(view, batch_size=3, num_workers=workers,
                                             collate_fn=collator)
        return list(loader)

    parallel, serial = run(2), run(0)
    assert [b["input_ids"].shape[0] for b in parallel] == [3, 3, 2]
    for a, b in zip(parallel, serial, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) or (key == "pixel_spacing" and torch.allclose(
                a[key], b[key], equal_nan=True)), key
    assert torch.cat([b["region_ids"] for b in parallel]).tolist() == [5, 4] * 3 + [-1, -1]
    transform.set_epoch(1)
    epoch1 = [text(i) for i in range(6)]
    transform.set_epoch(0)
    assert epoch1 != [text(i) for i in range(6)]  # another epoch, other draws

    only_seg = ds.with_transform(TaskTransform(TaskSampler({"segment": 1.0})))
    with pytest.raises(ValueError, match=r"'b0' supports none.*supports: report"):
        only_seg[6]


def test_collator_turns_are_supervised_after_the_first_eos():
    from echomoe.data.synthetic.generate import generate
    from echomoe.models import build_model, build_processor

    processor = build_processor("tiny", num_samples=20)
    probe = build_model("tiny", "dense")
    collator = VLMCollator(processor.tokenizer, probe.tokens_per_image, probe.config.image_size)
    tok = processor.tokenizer
    sample = generate(1, 4)[0]
    item = {"sample": sample, "prompt": "<image>\nClassify this study.\n", "target": "normal",
            "turns": [("Which organ is shown?\n", "liver")]}
    ids, labels = collator.tokenize(item["prompt"], item["target"], 1, sample.id, item["turns"])
    assert collator.sequence_length(item) == len(ids)
    supervised = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    expected = (tok.encode("normal", add_special_tokens=False) + [tok.eos_token_id]
                + tok.encode("liver", add_special_tokens=False) + [tok.eos_token_id])
    assert supervised == expected
    turn = collator.turn_length("Which organ is shown?\n", "liver")
    assert len(ids) == collator.sequence_length({**item, "turns": []}) + turn
    with pytest.raises(ValueError, match="turn 1 has an <image> token"):
        collator.tokenize(item["prompt"], item["target"], 1, sample.id, [("<image>\nx", "y")])
    short = VLMCollator(tok, probe.tokens_per_image, probe.config.image_size,
                        max_length=len(ids) - 2)
    cut, cut_labels = short.tokenize(item["prompt"], item["target"], 1, sample.id, item["turns"])
    assert cut == ids[:-2] and cut_labels == labels[:-2]
