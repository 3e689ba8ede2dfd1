"""Shared fixtures of the multi-process tests: tiny batches, checkpoints, the one-process
reference run, and a bounded ``torchrun`` launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from echomoe.distributed.runtime import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "_worker.py"
STEPS, WORLD, MICRO_BATCH = 5, 2, 2
TRAIN_KW = {"steps": STEPS, "lr": 3e-3, "warmup": 1, "clip": 1.0, "seed": 0, "progress": False}


class ListBatches:
    """A fixed list of collated batches as a random-access batch source (same every epoch)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.batch_size = int(batches[0]["input_ids"].shape[0])

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, epoch: int, index: int) -> dict:
        return self.batches[index]

    def iterate(self, epoch: int, start: int = 0):
        return (self.batches[i] for i in range(start, len(self)))


def make_batches(n: int = 16) -> list[dict]:
    from echomoe.data.collate import VLMCollator
    from echomoe.data.synthetic.generate import SyntheticConfig, generate
    from echomoe.models import build_model, build_processor
    from echomoe.train import MultiTaskBatches

    processor = build_processor("tiny", num_samples=n)
    samples = generate(n, 0, SyntheticConfig(image_size=32))
    probe = build_model("tiny", "dense")
    collator = VLMCollator(processor.tokenizer, probe.tokens_per_image, probe.config.image_size)
    rates = {"report": 1.0, "vqa": 1.0, "segment": 1.0, "detect": 1.0, "measure": 1.0}
    source = MultiTaskBatches(samples, collator=collator, rates=rates, batch_size=MICRO_BATCH,
                              seed=0)
    return [source.batch(0, i) for i in range(len(source))]


def run_torchrun(script_args: list[str], *, nproc: int = WORLD, timeout: float = 600,
                 env: dict | None = None, script: Path = WORKER) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc SCRIPT ...`` on 127.0.0.1
    with a free port, killed after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *script_args]
    return _run(cmd, timeout, env)


def run_single(script_args: list[str], *, timeout: float = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """The worker as one plain process (no torchrun)."""
    return _run([sys.executable, str(WORKER), *script_args], timeout, env)


def _run(cmd, timeout, env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "DS_BUILD_OPS": "0", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_result(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def max_state_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
