"""Shared helpers of the benchmark scripts: run a vqkit command as a user would, record the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def vqkit(*args: str) -> float:
    """Run `python -m vqkit.cli ARGS` and return its wall-clock seconds (raises if it fails)."""
    cmd = [sys.executable, "-m", "vqkit.cli", *args]
    print("$ vqkit", " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


@torch.no_grad()
def reconstruct(model_dir: str | Path, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Reconstructions in [-1, 1] of images [N, C, H, W] in [-1, 1] by the tokenizer saved in ``model_dir``."""
    from vqkit import VQModel

    model = VQModel.from_pretrained(model_dir).eval()
    return torch.cat([model(x).reconstruction.clamp(-1, 1) for x in images.split(batch_size)])


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def write_results(name: str, rows: list[dict], **extra) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **extra, "rows": rows}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {path}")
    return path
