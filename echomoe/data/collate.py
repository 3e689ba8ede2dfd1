"""Batching for the VLM: tokens with supervised targets, pixels, and grounding labels.

Pipeline::

    HF Dataset (schema records) --with_transform(TaskTransform(sampler))-->
        {"sample": UltrasoundSample, "task", "prompt", "target"} per row
    --DataLoader(collate_fn=VLMCollator(tokenizer, ...), num_workers=...)--> dict of tensors

Coordinate convention (matches :mod:`echomoe.data.schema`): a pixel index ``i`` covers
``[i, i + 1)``, so a keypoint ``(x, y)`` normalises to ``((x + 0.5) / W, (y + 0.5) / H)`` and an
inclusive box ``(x_min, y_min, x_max, y_max)`` to ``cx = (x_min + x_max + 1) / 2W``,
``w = (x_max - x_min + 1) / W`` (same for y / H).  ``W, H`` are the size of the *original* key
frame ``images[0]`` (``original_sizes``), so normalised labels do not change when images are
resized; a length in mm is ``hypot(dx * W, dy * H) * pixel_spacing`` for normalised ``dx, dy``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from echomoe.data.schema import REGIONS, UltrasoundSample, record_to_sample, region_index
from echomoe.data.tasks import (
    TASKS,
    TaskSampler,
    primary_box,
    primary_mask_name,
    supported_tasks,
)
from echomoe.data.tokenizer import (
    DET_TOKEN,
    IMAGE_TOKEN,
    KPT_TOKEN,
    SEG_TOKEN,
    special_token_ids,
)
from echomoe.utils.sizes import image_hw

IGNORE_INDEX = -100
"""Label value of positions without a loss (prompt, image tokens, padding)."""


def resize_image(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` uint8 -> ``(h, w)`` float32 in [0, 1] (PIL bilinear); ``size = (h, w)``."""
    from PIL import Image

    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"expected a (H, W) grayscale image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    if array.shape != size:
        array = np.asarray(Image.fromarray(array).resize(size[::-1], Image.BILINEAR))
    return array.astype(np.float32) / 255.0


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` boolean-like mask -> ``(h, w)`` float32 in {0, 1} (PIL nearest)."""
    from PIL import Image

    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) mask, got shape {mask.shape}")
    if mask.shape != size:
        im = Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)
        mask = np.asarray(im) > 127
    return mask.astype(np.float32)


def normalise_box(bbox: Sequence[float], height: int, width: int) -> tuple[float, ...]:
    """Inclusive pixel box ``(x_min, y_min, x_max, y_max)`` -> ``(cx, cy, w, h)`` in [0, 1]."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return ((x0 + x1 + 1) / (2 * width), (y0 + y1 + 1) / (2 * height),
            (x1 - x0 + 1) / width, (y1 - y0 + 1) / height)


def normalise_point(point: Sequence[float], height: int, width: int) -> tuple[float, float]:
    """Pixel ``(x, y)`` -> ``((x + 0.5) / W, (y + 0.5) / H)``."""
    x, y = (float(v) for v in point)
    return (x + 0.5) / width, (y + 0.5) / height


class VLMCollator:
    """Turn ``{"sample", "prompt", "target"[, "task"]}`` items into a padded batch.

    Each sequence is ``[bos] + prompt + target + [eos]`` (bos only if the tokenizer has one and
    ``add_bos``); prompt and target are tokenized separately (no BPE merge across them), each
    ``<image>`` in the prompt is expanded to ``image_tokens_per_image`` copies (their number must
    equal the sample's image count), and only target tokens + eos are supervised.  Sequences
    are right-padded with the pad token.  With ``max_length``, the target is truncated (then it
    may lose its eos or task token; the matching ``has_*`` flag turns False); a prompt that
    alone does not fit raises.

    Args:
        tokenizer: HF tokenizer with pad, eos and the echomoe special tokens
            (see :func:`echomoe.data.tokenizer.add_special_tokens_to`).
        image_tokens_per_image: number of image embeddings the model puts per image.
        image_size: ``int`` or ``(height, width)`` every image (and mask) is resized to.
        max_length: optional maximum sequence length (after image-token expansion).
        num_keypoints: ``K`` when ``keypoint_names`` is None: the first ``K`` keypoints of a
            sample in insertion order (a sample with fewer has only those supervised: see
            ``keypoint_mask``).
        keypoint_names: fixed keypoint names (``K = len(keypoint_names)``).
        regions: region list for ``region_ids``.
        diagnoses: label list for ``diagnosis_ids`` (the model's ``config.diagnoses``);
            ``None``: no ``diagnosis_ids`` in the batch.
        add_bos: prepend the tokenizer's bos token when it has one.

    Returns (from ``__call__``), with ``B`` items, ``L`` the longest sequence, ``N`` the most
    images of an item, ``(H, W) = image_size``:

    * ``input_ids``, ``attention_mask``, ``labels``: ``(B, L)`` long; ``labels`` is
      ``-100`` except on target tokens and eos.
    * ``pixel_values``: ``(B, N, 1, H, W)`` float32 in [0, 1] (zeros past ``image_counts``);
      ``image_counts``: ``(B,)`` long.
    * ``masks``: ``(B, H, W)`` float32 in {0, 1}; ``has_mask``: ``(B,)`` bool.
    * ``boxes``: ``(B, 4)`` float32 ``(cx, cy, w, h)`` normalised; ``has_box``: ``(B,)`` bool.
    * ``keypoints``: ``(B, K, 2)`` float32 normalised ``(x, y)``; ``has_keypoints``: ``(B,)``;
      ``keypoint_mask``: ``(B, K)`` bool, the points the sample has (its first ``n < K``
      points with ``num_keypoints``, as the evaluation scores them; all or none with
      ``keypoint_names``).
    * ``diagnosis_ids`` (with ``diagnoses``): ``(B,)`` long, the index of the sample's
      diagnosis in ``diagnoses`` (``-1``: the sample has none); every row about an image
      carries it, whatever its task.
    * ``region_ids``: ``(B,)`` long (``-1`` unknown); ``task_ids``: ``(B,)`` long, index in
      :data:`~echomoe.data.tasks.TASKS` (``-1`` if not given).
    * ``pixel_spacing``: ``(B,)`` float32 mm per *original* pixel (NaN unknown);
      ``original_sizes``: ``(B, 2)`` long ``(H, W)`` of the key frame.

    ``has_mask`` / ``has_box`` / ``has_keypoints`` are True only when the label exists *and* the
    sequence holds its task token (``[SEG]`` / ``[DET]`` / ``[KPT]``), i.e. exactly when the
    head has a hidden state to decode from; labels are zeros where the flag is False.
    """

    def __init__(
        self,
        tokenizer,
        image_tokens_per_image: int,
        image_size: int | Sequence[int],
        max_length: int | None = None,
        *,
        num_keypoints: int = 4,
        keypoint_names: Sequence[str] | None = None,
        regions: tuple[str, ...] = REGIONS,
        diagnoses: Sequence[str] | None = None,
        add_bos: bool = True,
    ):
        if image_tokens_per_image < 1:
            raise ValueError(f"image_tokens_per_image must be >= 1, got {image_tokens_per_image}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {max_length}")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(
                "tokenizer needs eos and pad tokens; call "
                "echomoe.data.tokenizer.add_special_tokens_to(tokenizer) first"
            )
        self.tokenizer = tokenizer
        self.token_ids = special_token_ids(tokenizer)  # raises if a token is missing
        self.image_tokens_per_image = int(image_tokens_per_image)
        self.image_size = image_hw(image_size)
        self.max_length = max_length
        self.keypoint_names = tuple(keypoint_names) if keypoint_names is not None else None
        self.num_keypoints = len(self.keypoint_names) if self.keypoint_names else num_keypoints
        if self.num_keypoints < 1:
            raise ValueError(f"need at least one keypoint, got {self.num_keypoints}")
        self.regions = tuple(regions)
        self.diagnoses = tuple(diagnoses) if diagnoses is not None else None
        self.add_bos = add_bos

    # ------------------------------------------------------------------------- tokens
    def tokenize(
        self, prompt: str, target: str, num_images: int, sample_id: str = "?",
        turns: Sequence[tuple[str, str]] = (),
    ) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one example (unpadded, ``<image>`` expanded).

        ``turns``: further ``(prompt, target)`` pairs about the same images, appended after
        the first target's eos (their prompts hold no ``<image>``; each target and its eos is
        supervised).  With ``max_length`` the sequence is cut there.
        """
        tok, image_id = self.tokenizer, self.token_ids[IMAGE_TOKEN]
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        found = prompt_ids.count(image_id)
        if found != num_images:
            raise ValueError(
                f"sample {sample_id!r}: prompt has {found} {IMAGE_TOKEN} token(s) but the "
                f"sample has {num_images} image(s)"
            )
        expanded: list[int] = []
        if self.add_bos and tok.bos_token_id is not None:
            expanded.append(tok.bos_token_id)
        for i in prompt_ids:
            expanded.extend([i] * self.image_tokens_per_image if i == image_id else [i])
        target_ids = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
        if self.max_length is not None:
            room = self.max_length - len(expanded)
            if room < 1:
                raise ValueError(
                    f"sample {sample_id!r}: prompt needs {len(expanded)} tokens (with "
                    f"{num_images} x {self.image_tokens_per_image} image tokens), "
                    f"max_length={self.max_length} leaves no room for the target"
                )
            target_ids = target_ids[:room]
        ids, labels = expanded + target_ids, [IGNORE_INDEX] * len(expanded) + target_ids
        for n, (turn_prompt, turn_target) in enumerate(turns, 1):
            turn_ids, turn_labels = self._turn(turn_prompt, turn_target)
            if image_id in turn_ids:
                raise ValueError(f"sample {sample_id!r}: turn {n} has an {IMAGE_TOKEN} token; "
                                 "only the first prompt holds the images")
            ids += turn_ids
            labels += turn_labels
        if self.max_length is not None:
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return ids, labels

    def _turn(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` of one further turn: its prompt, then its target and eos."""
        tok = self.tokenizer
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        target_ids = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
        return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids

    def turn_length(self, prompt: str, target: str) -> int:
        """Tokens one further turn adds to a sequence (see ``turns`` of :meth:`tokenize`)."""
        return len(self._turn(prompt, target)[0])

    def sequence_length(self, item: Mapping[str, Any]) -> int:
        """Tokens of one item's sequence (its row in a batch before padding)."""
        sample: UltrasoundSample = item["sample"]
        ids, _ = self.tokenize(item["prompt"], item["target"], len(sample.images), sample.id,
                               item.get("turns", ()))
        return len(ids)

    # ------------------------------------------------------------------------- labels
    def _keypoints(self, sample: UltrasoundSample) -> list[tuple[float, float]] | None:
        if self.keypoint_names is not None:
            if not all(name in sample.keypoints for name in self.keypoint_names):
                return None
            return [sample.keypoints[name] for name in self.keypoint_names]
        points = list(sample.keypoints.values())
        return points[: self.num_keypoints] or None

    def _diagnosis(self, sample: UltrasoundSample) -> int:
        if self.diagnoses is None or sample.diagnosis is None:
            return -1
        if sample.diagnosis not in self.diagnoses:
            raise ValueError(f"sample {sample.id!r}: diagnosis {sample.diagnosis!r} is not one "
                             f"of the model's diagnoses ({', '.join(self.diagnoses)})")
        return self.diagnoses.index(sample.diagnosis)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``B`` items (see the class docstring for the output shapes)."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        size, k = self.image_size, self.num_keypoints
        seg_id, det_id = self.token_ids[SEG_TOKEN], self.token_ids[DET_TOKEN]
        kpt_id = self.token_ids[KPT_TOKEN]
        rows = []
        for n, item in enumerate(features):
            missing = [key for key in ("sample", "prompt", "target") if key not in item]
            if missing:
                raise KeyError(f"batch item {n} lacks {missing}; expected keys sample, "
                               "prompt, target (and optionally task, turns)")
            sample: UltrasoundSample = item["sample"]
            if not sample.images:
                raise ValueError(f"sample {sample.id!r} has no images")
            ids, labels = self.tokenize(item["prompt"], item["target"], len(sample.images),
                                        sample.id, item.get("turns", ()))
            images = []
            for i in range(len(sample.images)):
                array = sample.image_array(i)
                if i == 0:
                    h0, w0 = np.shape(array)[:2]
                try:
                    images.append(resize_image(array, size))
                except ValueError as err:
                    raise ValueError(f"sample {sample.id!r}, image {i}: {err}") from err
            row: dict[str, Any] = {"ids": ids, "labels": labels, "images": images,
                                   "size": (h0, w0)}
            row["mask"] = None
            name = primary_mask_name(sample) if seg_id in ids else None
            if name is not None:
                mask = np.asarray(sample.masks[name])
                if mask.shape != (h0, w0):
                    raise ValueError(f"sample {sample.id!r}: mask {name!r} has shape "
                                     f"{mask.shape}, image 0 has {(h0, w0)}")
                row["mask"] = resize_mask(mask, size)
            box = primary_box(sample) if det_id in ids else None
            row["box"] = normalise_box(box["bbox"], h0, w0) if box is not None else None
            points = self._keypoints(sample) if kpt_id in ids else None
            row["points"] = (None if points is None
                             else [normalise_point(p, h0, w0) for p in points])
            row["region"] = region_index(sample.region, self.regions)
            row["diagnosis"] = self._diagnosis(sample)
            spacing = sample.pixel_spacing
            row["spacing"] = float(spacing) if spacing is not None else math.nan
            task = item.get("task")
            if task is not None and task not in TASKS:
                raise ValueError(f"batch item {n}: unknown task {task!r}; valid tasks: "
                                 f"{', '.join(TASKS)}")
            row["task"] = TASKS.index(task) if task is not None else -1
            rows.append(row)

        b = len(rows)
        length = max(len(r["ids"]) for r in rows)
        n_img = max(len(r["images"]) for r in rows)
        input_ids = torch.full((b, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        pixel_values = torch.zeros((b, n_img, 1, *size), dtype=torch.float32)
        masks = torch.zeros((b, *size), dtype=torch.float32)
        boxes = torch.zeros((b, 4), dtype=torch.float32)
        keypoints = torch.zeros((b, k, 2), dtype=torch.float32)
        keypoint_mask = torch.zeros((b, k), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = len(r["ids"])
            input_ids[i, :n] = torch.tensor(r["ids"])
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
            pixel_values[i, : len(r["images"]), 0] = torch.from_numpy(np.stack(r["images"]))
            if r["mask"] is not None:
                masks[i] = torch.from_numpy(r["mask"])
            if r["box"] is not None:
                boxes[i] = torch.tensor(r["box"])
            if r["points"] is not None:
                keypoints[i, : len(r["points"])] = torch.tensor(r["points"])
                keypoint_mask[i, : len(r["points"])] = True
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "image_counts": torch.tensor([len(r["images"]) for r in rows], dtype=torch.long),
            "masks": masks,
            "has_mask": torch.tensor([r["mask"] is not None for r in rows]),
            "boxes": boxes,
            "has_box": torch.tensor([r["box"] is not None for r in rows]),
            "keypoints": keypoints,
            "has_keypoints": torch.tensor([r["points"] is not None for r in rows]),
            "keypoint_mask": keypoint_mask,
            "region_ids": torch.tensor([r["region"] for r in rows], dtype=torch.long),
            "task_ids": torch.tensor([r["task"] for r in rows], dtype=torch.long),
            "pixel_spacing": torch.tensor([r["spacing"] for r in rows], dtype=torch.float32),
            "original_sizes": torch.tensor([r["size"] for r in rows], dtype=torch.long),
        }
        if self.diagnoses is not None:
            batch["diagnosis_ids"] = torch.tensor([r["diagnosis"] for r in rows],
                                                  dtype=torch.long)
        return batch


class TaskTransform:
    """``datasets.Dataset.with_transform`` function: schema records -> task examples.

    Each decoded row (a record of :func:`echomoe.data.schema.to_hf_dataset`) becomes
    ``{"sample": UltrasoundSample, "task": str, "prompt": str, "target": str}``, ready for
    :class:`VLMCollator`.  The task is drawn by ``sampler`` with the key
    ``(epoch, crc32(sample.id))``, so the choice depends on the seed, the epoch and the sample
    only (not on worker count or order); call :meth:`set_epoch` before each epoch for fresh
    draws.  A sample that supports no task with a positive rate raises (filter the dataset
    first, e.g. with ``sampler.supported``).

    Args:
        sampler: the :class:`~echomoe.data.tasks.TaskSampler`.
        epoch: initial epoch.
    """

    def __init__(self, sampler: TaskSampler, epoch: int = 0):
        self.sampler = sampler
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the tasks of another epoch (before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def key(self, sample: UltrasoundSample, epoch: int | None = None) -> tuple[int, int]:
        """The draw key of ``sample`` in ``epoch`` (default: the current one)."""
        return (self.epoch if epoch is None else int(epoch),
                zlib.crc32(sample.id.encode("utf-8")))

    def example(self, sample: UltrasoundSample) -> dict[str, Any]:
        """The task example of one sample (``{"sample", "task", "prompt", "target"}``)."""
        example = self.sampler(sample, key=self.key(sample))
        if example is None:
            raise ValueError(
                f"sample {sample.id!r} supports none of the tasks with a positive rate "
                f"({', '.join(t for t, r in self.sampler.rates.items() if r > 0)}); it "
                f"supports: {', '.join(supported_tasks(sample)) or 'nothing'}"
            )
        return {"sample": sample, "task": example.task, "prompt": example.prompt,
                "target": example.target}

    def __call__(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """Batch of decoded records (column -> list) -> columns sample, task, prompt, target."""
        if not batch:
            return {"sample": [], "task": [], "prompt": [], "target": []}
        columns = list(batch)
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(),
                                                                           strict=True)]
        examples = [self.example(record_to_sample(row)) for row in rows]
        return {key: [e[key] for e in examples] for key in ("sample", "task", "prompt", "target")}
