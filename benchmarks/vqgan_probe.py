"""Does the adversarial term help a *finished* tokenizer? Continue training it for a few hundred steps with the given
overrides (e.g. the GAN switched on) and print PSNR, SSIM and reconstruction FD on MNIST-5k TEST. Run it once without
GAN overrides as the control: continued training alone moves FD too.

    python benchmarks/vqgan_probe.py --init runs/bench-vqgan/mnist-vqvae                      # control
    python benchmarks/vqgan_probe.py --init runs/bench-vqgan/mnist-vqvae --steps 700 \\
        gan.enabled=true gan.disc_channels=32 gan.disc_layers=2 gan.disc_norm=none gan.lr=0.001 gan.gen_start=300

A diagnostic, not a bar: it runs the real TokenizerTask (same losses, discriminator and adaptive weight as
`vqkit train tokenizer`) at a constant learning rate, and logs what the discriminator does every 100 steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from _common import write_results
from vqkit.data.sources import load_mnist5k
from vqkit.evaluation import evaluate_tokenizer
from vqkit.models.tokenizer import VQModel
from vqkit.training.config import resolve_config
from vqkit.training.tasks import TokenizerTask
from vqkit.training.trainer import batch_indices

LOGGED = ("psnr", "d_loss", "g_loss", "d_weight", "logits_real", "logits_fake")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="a finished MNIST-5k tokenizer directory")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-4, help="constant learning rate of the tokenizer")
    ap.add_argument("--name", default="vqgan_probe", help="results file name under benchmarks/results/")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    cfg = resolve_config("mnist5k", preset="mnist-vqvae", overrides=[
        f"steps={args.steps}", f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.schedule=constant",
        *args.overrides])
    torch.manual_seed(cfg.seed)
    train, test = load_mnist5k("train"), load_mnist5k("test")
    task = TokenizerTask(cfg, VQModel.from_pretrained(args.init), torch.device("cpu"), test)
    started, window = time.time(), []
    for step in range(cfg.steps):
        # a batch order of its own (seed + 7), not a replay of the order the finished run was trained in
        images = torch.stack([train[int(i)][0] for i in batch_indices(len(train), cfg.batch_size, cfg.seed + 7, step)])
        window.append(task.train_step(images, None, step))
        if (step + 1) % 100 == 0:
            means = {k: round(sum(w.get(k, 0.0) for w in window) / len(window), 3) for k in LOGGED}
            print(f"step {step + 1}: {means}", flush=True)
            window = []
    ev = evaluate_tokenizer(task.model, test, feature_distance=True)
    row = {"init": args.init, "overrides": args.overrides, "steps": cfg.steps, "seconds": round(time.time() - started),
           **{k: ev[k] for k in ("psnr", "ssim", "fd_classifier", "fd_floor_train_test", "codebook_usage")}}
    print(json.dumps(row, indent=1))
    write_results(args.name, [row])


if __name__ == "__main__":
    main()
