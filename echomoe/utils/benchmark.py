"""Fair side-by-side timing on shared, noisy machines.

Candidates are timed in interleaved rounds (A, B, C, A, B, C, ...), so that a burst of load from
another process hits all of them alike, and reported as medians.  Ratios of medians measured in
one run are the figures worth quoting; absolute times are not stable across runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    min_seconds: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Run each candidate ``warmup`` times, then interleaved rounds.

    At least ``repeats`` rounds, and more for fast candidates, so that each round set lasts at
    least ``min_seconds`` (estimated from the warm-up).  Returns
    ``{name: {"median_ms", "min_ms", "max_ms", "rounds", "samples_ms"}}`` (``samples_ms``: the
    time of each round, in round order; see :func:`paired_ratio`).
    """
    round_s = 0.0
    for fn in candidates.values():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        round_s += (time.perf_counter() - start) / max(warmup, 1)
    if round_s > 0:
        repeats = max(repeats, int(min_seconds / round_s) + 1)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {
            "median_ms": statistics.median(ts),
            "min_ms": min(ts),
            "max_ms": max(ts),
            "rounds": len(ts),
            "samples_ms": ts,
        }
        for name, ts in samples.items()
    }


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``); ``False`` where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size (``VmHWM``) of this process since start or last reset, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_in_subprocess(argv: list[str], timeout: float = 600) -> dict:
    """Run ``python argv...`` and parse the JSON object it prints on its last line.

    Used for peak-memory figures, which need a fresh process per candidate.
    """
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict[str, object]:
    """Facts that make a benchmark figure interpretable."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def publish(payload: dict, text: str, path: str | Path) -> Path:
    """A benchmark's ending: print its table ``text``, write ``payload`` as JSON to ``path``."""
    print(text)
    path = write_json(path, payload)
    print(f"\nwrote {path}")
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    def fmt(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def paired_ratio(times: dict[str, dict], name: str, reference: str) -> float:
    """Median over rounds of ``time(name) / time(reference)`` from :func:`time_interleaved`.

    Each round runs every candidate back to back, so the two times of a round were measured
    under the same machine load; the median of those per-round ratios is steadier on a shared
    machine than a ratio of medians, whose numerator and denominator may come from different
    rounds.
    """
    pairs = zip(times[name]["samples_ms"], times[reference]["samples_ms"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def synthetic_token_ids(
    batch_size: int, seq_len: int, vocab_size: int, avoid: tuple[int, ...] = (), seed: int = 0
) -> Tensor:
    """``(batch_size, seq_len)`` random token ids in ``[0, vocab_size)``, none of them in ``avoid``
    (special tokens such as ``<image>`` or ``[SEG]``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    if avoid:
        special = torch.isin(ids, torch.tensor(avoid))
        safe = next(i for i in range(vocab_size) if i not in avoid)
        ids = ids.masked_fill(special, safe)
    return ids


def vlm_training_batch(config, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, Tensor]:
    """A synthetic training batch for an :class:`~echomoe.models.EchoMoEConfig` model.

    Each of the ``batch_size`` rows is one image's ``<image>`` tokens followed by random text up
    to ``seq_len`` tokens; labels are the text (image positions ``-100``); one region per row.
    Returns ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)``, ``pixel_values
    (B, 1, C, S, S)`` and ``region_ids (B,)``.
    """
    from echomoe.models.processor import image_tokens_per_image

    n_image = image_tokens_per_image(config)
    if seq_len <= n_image:
        raise ValueError(f"seq_len={seq_len} leaves no text after {n_image} image tokens")
    special = (config.image_token_id, config.seg_token_id, config.det_token_id,
               config.kpt_token_id)
    ids = synthetic_token_ids(batch_size, seq_len, config.text_config.vocab_size, special, seed)
    ids[:, :n_image] = config.image_token_id
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    gen = torch.Generator().manual_seed(seed + 1)
    size = config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.rand(batch_size, 1, config.in_channels, size, size, generator=gen),
        "region_ids": torch.arange(batch_size) % config.num_regions,
    }


def qwen2_reference_pair(
    hidden_size: int = 256,
    num_layers: int = 4,
    intermediate_size: int = 512,
    num_experts: int = 8,
    top_k: int = 2,
    vocab_size: int = 4096,
    seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """``transformers``' own dense / MoE pair at equal active FFN width, random weights.

    ``Qwen2ForCausalLM`` with MLP width ``intermediate_size`` and ``Qwen2MoeForCausalLM`` with
    ``num_experts`` experts of width ``intermediate_size / top_k``, ``top_k`` per token
    (renormalised), and no shared expert; same attention, vocabulary and depth.
    """
    import warnings

    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    if intermediate_size % top_k:
        raise ValueError(f"intermediate_size={intermediate_size} is not a multiple of "
                         f"top_k={top_k}")
    common = {"vocab_size": vocab_size, "hidden_size": hidden_size,
              "num_hidden_layers": num_layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048,
              "tie_word_embeddings": False}
    torch.manual_seed(seed)
    dense = Qwen2ForCausalLM(Qwen2Config(intermediate_size=intermediate_size, **common))
    moe_config = Qwen2MoeConfig(
        intermediate_size=intermediate_size, moe_intermediate_size=intermediate_size // top_k,
        shared_expert_intermediate_size=0, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, **common,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # the empty shared expert: "zero-element tensor" init
        warnings.simplefilter("ignore", UserWarning)
        moe = Qwen2MoeForCausalLM(moe_config)
    return dense, moe


def upcycle_fidelity(dense_lm: nn.Module, input_ids: Tensor, region_ids: Tensor | None,
                     *, random_router: bool = False, token_types: Tensor | None = None,
                     **moefy_kwargs) -> dict[str, float]:
    """How closely an upcycled copy of ``dense_lm`` reproduces it at its first forward.

    Converts a deep copy with :func:`~echomoe.moe.upcycle.moefy` (``upcycle=True``,
    ``moefy_kwargs``; ``random_router`` re-draws the routers ``N(0, 0.02^2)`` after upcycling,
    as an untrained router would be), runs both on ``input_ids`` (routed with ``region_ids``
    and the ``(B, T)`` ``token_types``, 0 text / 1 image, for modality routers) and returns:

    * ``ffn_rel_err_mean`` / ``ffn_rel_err_max``: over layers, ``|moe(x) - mlp(x)| / |mlp(x)|``
      with both applied to the *same* input ``x`` (the converted layer's input);
    * ``logits_rel_err``: ``|logits' - logits| / |logits|``;
    * ``top1_agreement``: fraction of positions whose arg-max token is unchanged;
    * ``loss_delta``: next-token loss on ``input_ids``, converted minus dense.
    """
    import copy

    from echomoe.moe.upcycle import decoder_layers, moefy

    dense_lm = dense_lm.eval()
    converted = copy.deepcopy(dense_lm)
    context = moefy(converted, upcycle=True, **moefy_kwargs)
    originals = [layer.mlp for layer in decoder_layers(dense_lm)]
    if random_router:
        with torch.no_grad():
            for module in converted.modules():
                if hasattr(module, "router") and hasattr(module.router, "weight"):
                    module.router.weight.normal_(std=0.02)
    errors: list[float] = []
    hooks = []
    for layer, original in zip(decoder_layers(converted), originals, strict=True):
        if layer.mlp is original:
            continue

        def record(_module, args, output, original=original):
            reference = original(args[0])
            errors.append(float((output - reference).norm() / reference.norm().clamp_min(1e-12)))

        hooks.append(layer.mlp.register_forward_hook(record))
    with torch.no_grad():
        ref = dense_lm(input_ids, labels=input_ids)
        with context.route(region_ids, token_types=token_types):
            out = converted(input_ids, labels=input_ids)
    for hook in hooks:
        hook.remove()
    return {
        "ffn_rel_err_mean": sum(errors) / max(len(errors), 1),
        "ffn_rel_err_max": max(errors, default=0.0),
        "logits_rel_err": float((out.logits - ref.logits).norm() / ref.logits.norm()),
        "top1_agreement": float((out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()),
        "loss_delta": float(out.loss - ref.loss),
    }
