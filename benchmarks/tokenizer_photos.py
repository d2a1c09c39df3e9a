"""Tokenizers on real RGB photos: the `photos` source (random crops of scikit-image's photos for TRAIN; the held-out
photos coffee and rocket, cut into 64x64 tiles, for TEST), at 640 bits per 64x64 crop (8x8 tokens, K=1024).

Rows: `photos-vqvae` and `photos-vqgan-f8` (L1+L2 + EfficientNet-Lite0 feature distance + PatchGAN), each trained for
the same number of steps (the presets are sized for a GPU; the discriminator's start steps are scaled with the run, in
the presets' proportions), and k-means on 8x8 RGB pixel patches with the same K (no network, same bits). Columns:
PSNR, SSIM, the EfficientNet-Lite0 feature distance to the originals (the `effnet` perceptual distance, lower is
closer), LPIPS where its weights are on this machine, codebook usage. Writes a side-by-side PNG of the TEST tiles
(originals, then each method) to RUNS/comparison.png and JSON to benchmarks/results/tokenizer_photos.json.

    python benchmarks/tokenizer_photos.py --steps 10000      # the presets as they are: for a GPU
    python benchmarks/tokenizer_photos.py --steps 1500 --override model.base_channels=32 --override batch_size=16
                                                             # a CPU-sized run (2 cores: ~25 min)
    python benchmarks/tokenizer_photos.py --reuse            # re-evaluate finished runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _common import reconstruct, vqkit, write_results

PATCH, CODES = 8, 1024


def test_tiles() -> torch.Tensor:
    from vqkit.data import load_source
    from vqkit.metrics.classifier import source_tensors

    return source_tensors(load_source("photos", "test"))[0]  # [N, 3, 64, 64] in [-1, 1]


def kmeans_patch_baseline(test: torch.Tensor, crops: int = 3000, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """k-means (mini-batch) on non-overlapping 8x8 RGB patches of TRAIN crops; TEST tiles coded with its centres."""
    from sklearn.cluster import MiniBatchKMeans

    from vqkit.data import load_source

    def patches(images: torch.Tensor) -> np.ndarray:  # [N, 3, H, W] -> [N * (H/8) * (W/8), 192]
        p = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [N, 3, h, w, 8, 8]
        return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * PATCH * PATCH).numpy()

    train = load_source("photos", "train")
    rng = np.random.default_rng(seed)
    images = torch.stack([train.get(i % len(train), rng)[0] for i in range(crops)])  # random crops, as in training
    started = time.time()
    km = MiniBatchKMeans(n_clusters=CODES, random_state=seed, batch_size=4096, n_init=1, max_iter=50)
    km.fit(patches(images))
    seconds = time.time() - started
    codes = km.predict(patches(test))
    n, _, height, width = test.shape
    h, w = height // PATCH, width // PATCH
    recon = torch.from_numpy(km.cluster_centers_[codes]).float().reshape(n, h, w, 3, PATCH, PATCH)
    recon = recon.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, height, width).clamp(-1, 1)
    counts = np.bincount(codes, minlength=CODES)
    row = {"name": f"k-means {PATCH}x{PATCH} RGB patches, K={CODES}", "codebook_usage": float((counts > 0).mean()),
           "bits_per_image": h * w * float(np.log2(CODES)), "train_seconds": round(seconds, 1)}
    return row, recon


@torch.no_grad()
def image_scores(test: torch.Tensor, recon: torch.Tensor, effnet, lpips) -> dict:
    from vqkit.metrics import psnr_per_image, ssim_per_image

    a, b = (test + 1) / 2, (recon + 1) / 2
    scores = {"psnr": float(psnr_per_image(a, b).mean()), "ssim": float(ssim_per_image(a, b).mean()),
              "effnet_distance": float(effnet(recon, test).mean())}
    if lpips is not None:
        scores["lpips_vgg"] = float(lpips(recon, test).mean())
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/bench-photos")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to both presets (e.g. a narrower model for a CPU run)")
    args = ap.parse_args()
    from vqkit.data import make_grid, save_image
    from vqkit.evaluation import lpips_if_available
    from vqkit.losses.perceptual import build_perceptual

    test = test_tiles()
    common = [f"steps={args.steps}", f"ckpt_every={max(args.steps // 5, 1)}", *args.override]
    overrides = {"photos-vqvae": common,
                 "photos-vqgan-f8": [*common, f"gan.disc_start={args.steps // 10}", f"gan.gen_start={args.steps // 5}"]}
    rows, recons = [], []
    for preset, extra in overrides.items():
        out = Path(args.runs) / preset
        wall = None
        if not (args.reuse and (out / "eval.json").is_file()):
            wall = vqkit("train", "tokenizer", "--data", "photos", "--preset", preset, "--out", str(out), *extra)
        ev = json.loads((out / "eval.json").read_text())
        rows.append({"name": preset, "overrides": extra, "codebook_usage": ev["codebook_usage"],
                     "bits_per_image": ev["bits_per_image"],
                     "train_seconds": round(wall, 1) if wall else ev.get("train_seconds")})
        recons.append(reconstruct(out, test))
    baseline, baseline_recon = kmeans_patch_baseline(test)
    rows.append(baseline)
    recons.append(baseline_recon)

    effnet = build_perceptual("effnet")
    lpips, lpips_note = lpips_if_available()
    for row, recon in zip(rows, recons):
        row.update(image_scores(test, recon, effnet, lpips))
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    # 8 tiles per block: originals, then each method's reconstructions of them
    blocks = [torch.cat([test[s:s + 8], *[r[s:s + 8] for r in recons]]) for s in range(0, len(test), 8)]
    save_image(runs / "comparison.png", make_grid((torch.cat(blocks) + 1) / 2, nrow=8))

    header = f"{'method':<34} {'PSNR dB':>8} {'SSIM':>7} {'effnet d':>9} {'LPIPS':>7} {'usage':>7} {'bits':>5} {'train s':>8}"
    print(f"\nphotos TEST ({len(test)} tiles of 64x64 from coffee and rocket)\n" + header + "\n" + "-" * len(header))
    for r in rows:
        lp = f"{r['lpips_vgg']:7.4f}" if "lpips_vgg" in r else f"{'-':>7}"
        print(f"{r['name']:<34} {r['psnr']:8.2f} {r['ssim']:7.4f} {r['effnet_distance']:9.4f} {lp} "
              f"{100 * r['codebook_usage']:6.1f}% {r['bits_per_image']:5.0f} {r['train_seconds'] or float('nan'):8.0f}")
    if lpips is None:
        print(f"LPIPS not computed: {lpips_note}")
    print(f"side by side: {runs / 'comparison.png'} (rows: originals, " + ", ".join(r["name"] for r in rows) + ")")
    write_results("tokenizer_photos", rows, steps=args.steps, overrides=args.override, test_tiles=len(test),
                  lpips_note=None if lpips is not None else lpips_note)


if __name__ == "__main__":
    main()
