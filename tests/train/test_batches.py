"""Batch sources: length grouping in MultiTaskBatches."""

from __future__ import annotations

import numpy as np
import pytest

from echomoe.data.collate import VLMCollator
from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.data.tasks import TASKS
from echomoe.models import build_model, build_processor
from echomoe.train import MultiTaskBatches

RATES = {task: 1.0 for task in TASKS}


@pytest.fixture(scope="module")
def data():
    """31 synthetic cases (an uneven count) and a collator for the ``tiny`` preset."""
    processor = build_processor("tiny", num_samples=31)
    probe = build_model("tiny", "dense")
    collator = VLMCollator(processor.tokenizer, probe.tokens_per_image, probe.config.image_size)
    return {"samples": generate(31, 0, SyntheticConfig(image_size=32)), "collator": collator}


def batches(data, **kwargs) -> MultiTaskBatches:
    kwargs = {"batch_size": 4, "seed": 0, **kwargs}
    return MultiTaskBatches(data["samples"], collator=data["collator"], rates=RATES, **kwargs)


def lengths_of(source: MultiTaskBatches, epoch: int) -> list[list[int]]:
    """Per batch, the unpadded length of each row."""
    return [source.batch(epoch, i)["attention_mask"].sum(1).tolist() for i in range(len(source))]


def padding(source: MultiTaskBatches, epoch: int) -> float:
    rows = lengths_of(source, epoch)
    return 1.0 - sum(map(sum, rows)) / sum(max(r) * len(r) for r in rows)


def test_sequence_length_is_the_collated_row_length(data):
    source = batches(data)
    items = [source.item(i, 0) for i in range(6)]
    batch = data["collator"](items)
    expected = batch["attention_mask"].sum(1).tolist()
    assert [data["collator"].sequence_length(item) for item in items] == expected
    assert len(set(expected)) > 1  # the tasks differ in length, or the test proves nothing


@pytest.mark.parametrize("drop_last", [True, False])
def test_grouped_epoch_is_a_permutation_with_the_remainder_last(data, drop_last):
    plain = batches(data, drop_last=drop_last)
    grouped = batches(data, drop_last=drop_last, group_by_length=True, group_window=3)
    for epoch in (0, 1):
        order = grouped.order(epoch)
        assert sorted(order.tolist()) == list(range(31))
        # the same 3 samples (31 = 7 x 4 + 3) are left over as without grouping
        assert sorted(order[28:].tolist()) == sorted(plain.order(epoch)[28:].tolist())
    assert len(grouped) == (7 if drop_last else 8)
    assert grouped.order(0).tolist() != grouped.order(1).tolist()


def test_grouping_sorts_each_window_and_cuts_the_padding(data):
    grouped = batches(data, group_by_length=True, group_window=100)  # one window: the epoch
    rows = lengths_of(grouped, 0)
    # one window sorted by length: batches are contiguous runs, so their ranges never overlap
    spans = sorted((min(r), max(r)) for r in rows)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))
    assert padding(grouped, 0) < 0.5 * padding(batches(data), 0)
    # smaller windows still group, a little less tightly
    assert padding(batches(data, group_by_length=True, group_window=2), 0) < padding(
        batches(data), 0)


def test_grouped_batches_depend_only_on_seed_and_epoch(data):
    first = batches(data, group_by_length=True, seed=3)
    again = batches(data, group_by_length=True, seed=3)  # a resumed run's fresh object
    first.order(1)  # cache another epoch first: must not matter
    for epoch in (0, 1):
        np.testing.assert_array_equal(first.order(epoch), again.order(epoch))
        for index in (0, len(first) - 1):
            a, b = first.batch(epoch, index), again.batch(epoch, index)
            assert a["input_ids"].equal(b["input_ids"]) and a["task_ids"].equal(b["task_ids"])
    assert batches(data, group_by_length=True, seed=4).order(0).tolist() != \
        first.order(0).tolist()


def test_grouping_rejects_bad_arguments(data):
    with pytest.raises(TypeError, match="sequence_length"):
        MultiTaskBatches(data["samples"], collator=lambda items: {}, rates=RATES, batch_size=4,
                         group_by_length=True)
    with pytest.raises(ValueError, match="group_window"):
        batches(data, group_by_length=True, group_window=0)


# ----------------------------------------------------------------------------- turn packing
def test_packed_rows_keep_the_first_turn_and_the_batch_shape(data):
    plain, packed = batches(data), batches(data, pack_turns=True)
    tok = data["collator"].tokenizer
    grew = 0
    for i in range(len(plain)):
        a, b = plain.batch(0, i), packed.batch(0, i)
        assert a["input_ids"].shape == b["input_ids"].shape  # no row outgrows the longest
        assert a["task_ids"].tolist() == b["task_ids"].tolist()
        for row in range(a["input_ids"].shape[0]):
            n = int(a["attention_mask"][row].sum())
            # the first turn (prompt, target, eos) is exactly the unpacked row
            assert b["input_ids"][row, :n].tolist() == a["input_ids"][row, :n].tolist()
            assert b["labels"][row, :n].tolist() == a["labels"][row, :n].tolist()
            grew += int(b["attention_mask"][row].sum()) > n
        # a row holds each task token at most once, and one wherever its head is supervised
        for flag, token in (("has_mask", "[SEG]"), ("has_box", "[DET]"),
                            ("has_keypoints", "[KPT]")):
            counts = (b["input_ids"] == tok.convert_tokens_to_ids(token)).sum(1)
            assert counts.max() <= 1
            assert (counts[b[flag]] == 1).all()
        assert (b["labels"] != -100).sum() >= (a["labels"] != -100).sum()
        assert b["has_mask"].sum() >= a["has_mask"].sum()
    assert grew > len(plain)  # packing added turns to many rows, not to a handful


def test_packing_is_deterministic_and_needs_turn_lengths(data):
    one, two = batches(data, pack_turns=True), batches(data, pack_turns=True)
    for i in (0, 3):
        assert one.batch(1, i)["input_ids"].tolist() == two.batch(1, i)["input_ids"].tolist()
    with pytest.raises(TypeError, match="pack_turns needs a collator with turn_length"):
        MultiTaskBatches(data["samples"], collator=lambda items: items, rates=RATES,
                         batch_size=4, pack_turns=True)


def test_follow_ups_never_repeat_a_once_per_row_task_or_the_first_question(data):
    from echomoe.data.tasks import TaskSampler, image_prefix

    sampler = TaskSampler(RATES, seed=0)
    for sample in data["samples"][:12]:
        first = sampler(sample, key=(0, 1))
        turns = sampler.follow_ups(sample, first, key=(0, 1))
        tasks = [t.task for t in turns]
        for task in set(tasks) - {"vqa"}:
            assert tasks.count(task) == 1
        if first.task != "vqa":
            assert first.task not in tasks
        else:
            asked = [qa["question"] for qa in sample.qa if qa["question"] in first.prompt]
            assert asked
            assert not any(q in t.prompt for q in asked for t in turns if t.task == "vqa")
        assert all(not t.prompt.startswith(image_prefix(sample)) for t in turns)
        assert all("<image>" not in t.prompt for t in turns)
