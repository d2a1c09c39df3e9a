"""Tokenizer benchmark on MNIST-5k TEST: vqkit presets against the classical k-means patch baseline.

Runs each preset exactly as a user would (`vqkit train tokenizer --data mnist5k --preset P --out DIR`), times it,
reads its eval.json, fits the k-means baseline in the same run, prints one table and writes JSON to
benchmarks/results/tokenizer_mnist.json.

    python benchmarks/tokenizer_mnist.py                         # default newcomer preset (~10 min on 2 CPU cores)
    python benchmarks/tokenizer_mnist.py --presets mnist-vqvae mnist-long
    python benchmarks/tokenizer_mnist.py --reuse runs/bench      # re-read finished runs instead of training
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vqkit.data import load_source
from vqkit.metrics import psnr_per_image, ssim_per_image

RESULTS = Path(__file__).resolve().parent / "results"


def kmeans_patch_baseline(patch: int = 4, k: int = 512, seed: int = 0) -> dict:
    """k-means codebook on non-overlapping patch x patch pixel patches, fit on TRAIN, evaluated on TEST."""
    from sklearn.cluster import KMeans

    def patches(images: torch.Tensor) -> np.ndarray:  # [N,1,28,28] in [0,1] -> [N*49, 16]
        n = images.shape[0]
        p = images.unfold(2, patch, patch).unfold(3, patch, patch)  # [N,1,7,7,4,4]
        return p.reshape(n, -1, patch * patch).reshape(-1, patch * patch).numpy()

    train = (load_source("mnist5k", "train").tensors()[0] + 1) / 2
    test = (load_source("mnist5k", "test").tensors()[0] + 1) / 2
    t0 = time.time()
    km = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit(patches(train))
    seconds = time.time() - t0
    codes = km.predict(patches(test))
    rec = torch.from_numpy(km.cluster_centers_[codes]).float().clamp(0, 1)
    g = 28 // patch
    rec = rec.reshape(len(test), g, g, patch, patch).permute(0, 1, 3, 2, 4).reshape(len(test), 1, 28, 28)
    counts = np.bincount(codes, minlength=k)
    p = counts[counts > 0] / counts.sum()
    return {"name": f"k-means {patch}x{patch} patches, K={k}", "psnr": float(psnr_per_image(test, rec).mean()),
            "ssim": float(ssim_per_image(test, rec).mean()), "codebook_usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())), "bits_per_image": g * g * float(np.log2(k)),
            "train_seconds": round(seconds, 1)}


def run_preset(preset: str, out: Path, reuse: bool) -> dict:
    if not (reuse and (out / "eval.json").is_file()):
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} exists; remove it or pass --reuse")
        cmd = [sys.executable, "-m", "vqkit.cli", "train", "tokenizer", "--data", "mnist5k", "--preset", preset,
               "--out", str(out)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - t0
    else:
        wall = None
    ev = json.loads((out / "eval.json").read_text())
    ev["name"] = f"vqkit {preset}"
    ev["wall_seconds"] = round(wall, 1) if wall is not None else None
    return ev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["mnist-vqvae"], help="presets to train (none: baseline only)")
    ap.add_argument("--runs", default="runs/bench-tokenizer", help="where the training runs go")
    ap.add_argument("--reuse", action="store_true", help="read finished runs instead of training again")
    args = ap.parse_args()

    rows = [run_preset(p, Path(args.runs) / p, args.reuse) for p in args.presets]
    rows.append(kmeans_patch_baseline())
    header = f"{'method':<34} {'PSNR dB':>8} {'SSIM':>7} {'usage':>7} {'bits':>6} {'train s':>8}"
    print("\nMNIST-5k TEST (1000 images)\n" + header + "\n" + "-" * len(header))
    for r in rows:
        secs = r.get("wall_seconds") or r.get("train_seconds")
        print(f"{r['name']:<34} {r['psnr']:8.2f} {r['ssim']:7.4f} {100 * r['codebook_usage']:6.1f}% "
              f"{r['bits_per_image']:6.0f} {secs if secs is not None else float('nan'):8.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "tokenizer_mnist", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "rows": rows}
    path = RESULTS / "tokenizer_mnist.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
