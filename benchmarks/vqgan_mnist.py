"""VQGAN vs VQ-VAE on MNIST-5k TEST at the same token budget: PSNR, SSIM and reconstruction FD (features of vqkit's
classifier trained on TRAIN only), with the FD(TRAIN, TEST) floor. Bar: the VQGAN lowers FD by >= 30% while its PSNR
stays within 1.0 dB of the VQ-VAE's.

    python benchmarks/vqgan_mnist.py                  # trains mnist-vqvae and mnist-vqgan (~8 + ~12 min on 2 cores)
    python benchmarks/vqgan_mnist.py --reuse          # re-evaluate finished runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import vqkit, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/bench-vqgan")
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args()
    rows = []
    for preset in ("mnist-vqvae", "mnist-vqgan"):
        out = Path(args.runs) / preset
        wall = None
        if not (args.reuse and (out / "eval.json").is_file()):
            wall = vqkit("train", "tokenizer", "--data", "mnist5k", "--preset", preset, "--out", str(out))
        vqkit("eval", "tokenizer", "--model", str(out), "--data", "mnist5k", "--json", str(out / "eval_fd.json"))
        ev = json.loads((out / "eval_fd.json").read_text())
        ev["name"] = preset
        ev["train_seconds"] = round(wall, 1) if wall else json.loads((out / "eval.json").read_text()).get("train_seconds")
        rows.append(ev)
    base, gan = rows
    fd_drop = 1 - gan["fd_classifier"] / base["fd_classifier"]
    psnr_gap = base["psnr"] - gan["psnr"]
    header = f"{'model':<14} {'PSNR dB':>8} {'SSIM':>7} {'recon FD':>9} {'usage':>7} {'bits':>5} {'train s':>8}"
    print("\nMNIST-5k TEST (1000 images)\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['name']:<14} {r['psnr']:8.2f} {r['ssim']:7.4f} {r['fd_classifier']:9.3f} "
              f"{100 * r['codebook_usage']:6.1f}% {r['bits_per_image']:5.0f} {r['train_seconds'] or float('nan'):8.0f}")
    print(f"{'FD(TRAIN,TEST)':<14} {'':>8} {'':>7} {base['fd_floor_train_test']:9.3f}   (floor: two real samples)")
    print(f"\nFD reduction {100 * fd_drop:.1f}% (bar >= 30%), PSNR gap {psnr_gap:.2f} dB (bar <= 1.0)")
    write_results("vqgan_mnist", rows, fd_reduction=fd_drop, psnr_gap_db=psnr_gap,
                  bar_met=bool(fd_drop >= 0.30 and psnr_gap <= 1.0))


if __name__ == "__main__":
    main()
