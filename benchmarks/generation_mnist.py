"""Class-conditional generation on MNIST-5k: AR prior, masked prior (8 steps) and a plain GAN, trained on TRAIN,
judged by vqkit's classifier (trained on TRAIN only): class accuracy, FD and KID against TEST beside the
FD(TRAIN, TEST) floor, latency at batch 1 and throughput at batch 64. Each generator makes as many samples as TRAIN
has, with TRAIN's labels (4000), so its FD and the floor are taken at the same number of images (FD's bias depends
on it: 1000 real TRAIN images score ~1.0 against TEST, all 4000 score ~0.36).

``--distilled-mask`` adds a masked prior distilled from the AR prior as another row: the masked preset's prior
trained 3000 more steps (lr 3e-4) on TRAIN's grids plus 100000 of the AR prior's samples (``--teacher``), sampled
without guidance, so each step is one forward at batch 1 (stop 27); ``--bidirectional-mask`` the masked preset of
stop 22, bidirectional attention on Halton masks for 6000 steps (about the training time of the group-causal
preset's 3000).

    python benchmarks/generation_mnist.py            # trains the tokenizer, both priors and the GAN
    python benchmarks/generation_mnist.py --reuse    # re-evaluate finished runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import vqkit, write_results


def evaluate(kind: str, path: Path) -> dict:
    from vqkit.apps.sample_eval import evaluate_class_samples, gan_generator, prior_generator

    tokenizer = None
    if kind == "gan":
        from vqkit.models.gan import DCGAN

        generate = gan_generator(DCGAN.from_pretrained(path))
    else:
        from vqkit.apps.generate import load_generator

        prior, tokenizer, sampling = load_generator(path)
        generate = prior_generator(prior, tokenizer, sampling)
    # as many samples as TRAIN has, with its labels: FD(samples, TEST) then reads directly against FD(TRAIN, TEST)
    return evaluate_class_samples(generate, "mnist5k", tokenizer=tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/bench-generation")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--distilled-mask", action="store_true", dest="distilled_mask",
                    help="also a masked prior distilled from the AR prior")
    ap.add_argument("--bidirectional-mask", action="store_true", dest="bidirectional",
                    help="also the masked prior with bidirectional attention (the preset before stop 24)")
    args = ap.parse_args()
    runs = Path(args.runs)
    tok = runs / "tokenizer"

    def train(path: Path, *cmd: str) -> None:
        if not (args.reuse and (path / "eval.json").is_file()):
            vqkit(*cmd)

    train(tok, "train", "tokenizer", "--data", "mnist5k", "--preset", "mnist-demo-tokenizer", "--out", str(tok))
    train(runs / "prior-ar", "train", "prior", "--tokenizer", str(tok), "--data", "mnist5k", "--mode", "ar",
          "--preset", "mnist-prior-ar", "--out", str(runs / "prior-ar"))
    train(runs / "prior-mask", "train", "prior", "--tokenizer", str(tok), "--data", "mnist5k", "--mode", "mask",
          "--preset", "mnist-prior-mask", "--out", str(runs / "prior-mask"))
    if args.distilled_mask:
        train(runs / "prior-mask-distilled", "train", "prior", "--tokenizer", str(tok), "--data", "mnist5k",
              "--mode", "mask", "--preset", "mnist-prior-mask", "--teacher", str(runs / "prior-ar"),
              "--out", str(runs / "prior-mask-distilled"), "distill_samples=100000",
              f"init_from={runs / 'prior-mask'}", "steps=3000", "optim.lr=0.0003", "sampling.guidance_scale=1.0")
    if args.bidirectional:
        train(runs / "prior-mask-bidir", "train", "prior", "--tokenizer", str(tok), "--data", "mnist5k", "--mode",
              "mask", "--preset", "mnist-prior-mask", "--out", str(runs / "prior-mask-bidir"),
              "prior.mask_attention=bidirectional", "steps=6000")
    train(runs / "gan", "train", "gan", "--data", "mnist5k", "--out", str(runs / "gan"))

    rows = []
    generators = [("VQ-VAE + AR prior", "prior", runs / "prior-ar"),
                  ("VQ-VAE + masked prior (8 steps)", "prior", runs / "prior-mask"),
                  ("GAN (DCGAN, class-cond.)", "gan", runs / "gan")]
    if args.distilled_mask:
        generators.insert(2, ("  masked, distilled from AR", "prior", runs / "prior-mask-distilled"))
    if args.bidirectional:
        generators.insert(2, ("  masked, bidirectional, 6000 st.", "prior", runs / "prior-mask-bidir"))
    for name, kind, path in generators:
        r = evaluate(kind, path)
        r["name"] = name
        rows.append(r)
    header = (f"{'method':<32} {'acc':>6} {'FD':>8} {'floor':>7} {'FD/floor':>8} {'tok.ceil':>8} {'KID':>8} "
              f"{'NN ratio':>8} {'lat b1 ms':>10} {'img/s b64':>10}")
    print(f"\nMNIST-5k, {rows[0]['num_samples']} samples (TRAIN's labels) against TEST; floor = FD(TRAIN, TEST) "
          f"at the same number of images;\ntok.ceil = FD(TRAIN's reconstructions, TEST): what a prior that "
          f"reproduced TRAIN's grids would score;\nNN ratio = samples' mean feature distance to their nearest TRAIN "
          f"image / TEST's (1: as novel as new real images, well below 1: copies)\n"
          + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['name']:<32} {100 * r['class_accuracy']:5.1f}% {r['fd']:8.3f} {r['fd_floor_same_n']:7.3f} "
              f"{r['fd_over_floor']:8.2f} {r.get('fd_tokenizer_ceiling', float('nan')):8.3f} {r['kid']:8.4f} "
              f"{r['train_nearest_neighbour_ratio']:8.2f} {1000 * r['latency_batch1_seconds']:10.1f} "
              f"{r['throughput_batch64_images_per_second']:10.1f}")
    ar = rows[0]
    print("\nagainst the AR prior, latency at batch 1 with decoding to pixels (bar: >= 4x faster; "
          "benchmarks/prior_latency.py times the priors alone) and FD (bar: <= 1.25x):")
    for mask in rows[1:-1]:
        mask["vs_ar_latency_speedup"] = ar["latency_batch1_seconds"] / mask["latency_batch1_seconds"]
        mask["vs_ar_fd_ratio"] = mask["fd"] / ar["fd"]
        print(f"  {mask['name'].strip():<32} {mask['vs_ar_latency_speedup']:.2f}x faster, FD {mask['vs_ar_fd_ratio']:.2f}x")
    write_results("generation_mnist", rows, mask_vs_ar_latency_speedup=rows[1]["vs_ar_latency_speedup"])


if __name__ == "__main__":
    main()
