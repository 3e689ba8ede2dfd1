"""The generation recipe end to end: synthetic cases -> trained generator -> scores by code.

:func:`run_generation` generates a synthetic benchmark, trains a lesion segmenter on the real
training images (the judge), trains an :class:`~echomoe.generation.model.ImageGenerator` (an
echomoe VLM of ``preset`` / ``variant`` + a flow-matching head) with :func:`echomoe.train.train`
on the same images, generates the test cases' images from their requests and scores them
(:func:`~echomoe.generation.evaluate.generation_report`: ``generated`` beside the ``real`` and
``shuffled`` reference rows).  ``experiments/benchmarks/generation.py`` is its command line.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def run_generation(*, preset: str = "tiny", variant: str = "dense", n: int = 300,
                   image_size: int = 32, steps: int = 300, batch_size: int = 16,
                   lr: float = 2e-3, width: int = 16, depth: int = 3, mask: bool = True,
                   sample_steps: int = 20, segmenter_steps: int = 400,
                   seed: int = 0) -> dict[str, Any]:
    """Train and score one generator (see the module docstring); returns the figures:
    ``report`` (rows ``generated`` / ``real`` / ``shuffled``), ``losses`` (first / last),
    ``parameters`` of the head and the timings."""
    from echomoe.data.synthetic.generate import SyntheticConfig, generate
    from echomoe.generation.evaluate import generation_report, train_segmenter
    from echomoe.generation.flow import FlowMatchingHead
    from echomoe.generation.model import GenerationCollator, ImageGenerator
    from echomoe.models import build_model, build_processor
    from echomoe.train import IndexedBatches, train

    samples = generate(n, seed, SyntheticConfig(image_size=image_size))
    cut = int(0.8 * n)
    train_cases, test_cases = samples[:cut], samples[cut:]
    started = time.perf_counter()
    segmenter = train_segmenter(train_cases, image_size=image_size, steps=segmenter_steps,
                                seed=seed)
    segmenter_time = time.perf_counter() - started
    tokenizer = build_processor(preset, num_samples=min(n, 200)).tokenizer
    torch.manual_seed(seed)
    vlm = build_model(preset, variant)
    head = FlowMatchingHead(vlm.config.text_config.hidden_size, image_size, width=width,
                            depth=depth, cond_dim=4 * width, mask_channels=int(mask))
    generator = ImageGenerator(vlm, head)
    collate = GenerationCollator(tokenizer, image_size)
    started = time.perf_counter()
    history = train(generator, IndexedBatches(train_cases, collate_fn=collate,
                                              batch_size=batch_size, seed=seed),
                    steps=steps, lr=lr, warmup=min(20, steps // 10), progress=False, seed=seed)
    train_time = time.perf_counter() - started
    batch = collate(test_cases)
    images = generator.generate(batch["input_ids"], batch["attention_mask"],
                                region_ids=batch["region_ids"], masks=batch["masks"],
                                steps=sample_steps, generator=torch.Generator().manual_seed(seed))
    report = generation_report(segmenter, images, test_cases, image_size=image_size,
                               reference=train_cases, seed=seed)
    return {"preset": preset, "variant": variant, "n": n, "image_size": image_size,
            "steps": steps, "mask_conditioned": mask, "seed": seed, "report": report,
            "losses": {"first": history[0]["loss"], "last": history[-1]["loss"]},
            "parameters": {"head": sum(p.numel() for p in head.parameters()),
                           "vlm": sum(p.numel() for p in vlm.parameters())},
            "seconds": {"segmenter": segmenter_time, "train": train_time}}
