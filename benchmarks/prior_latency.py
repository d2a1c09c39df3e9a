"""Where the time of one sampled image goes: the AR prior (KV cache) against the masked prior (parallel steps).

Times ``TokenPrior.sample`` alone (no decoding) for one image (batch 1) and per image at batch 64, with the priors'
own sampling settings (guidance doubles the batch), in fp32 and with the weights cast to bf16, plus one forward pass
of the masked prior over a full grid. Each figure is the median of repeated runs after a warm-up, all in one process,
so read the ratios. On a GPU the same script runs there (``--device cuda``).

    python benchmarks/prior_latency.py --ar runs/bench-generation/prior-ar --mask runs/bench-generation/prior-mask

Latency does not depend on the weights (the AR prior always runs its sequence length in steps, the masked prior its
scheduled steps), so ``--untrained`` times priors built from presets with random weights, on the benchmark's
token grid, with no training first: what a session with a GPU for a few minutes can measure at once.

    python benchmarks/prior_latency.py --untrained --ar mnist-prior-ar \
        --mask "mnist-prior-mask sampling.guidance_scale=1.0 sampling.temperature=1.1" --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import write_results


def median_ms(fn, repeats: int, device: torch.device) -> float:
    fn(0)  # warm-up
    times = []
    for r in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(r + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ar", required=True, help="AR prior directory (with --untrained: PRESET [key=value ...])")
    ap.add_argument("--mask", required=True, nargs="+",
                    help="masked prior directories, one or more (with --untrained: \"PRESET [key=value ...]\" each); an AR "
                         "prior here (e.g. without guidance) is timed too and labelled as one")
    ap.add_argument("--untrained", action="store_true",
                    help="build the priors from presets with random weights instead of loading trained ones")
    ap.add_argument("--codebook-size", type=int, default=64, help="with --untrained (the benchmark's tokenizer: 64)")
    ap.add_argument("--grid", type=int, default=7, help="with --untrained: tokens per side")
    ap.add_argument("--num-classes", type=int, default=10, help="with --untrained (0: unconditional)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)

    from vqkit.apps.generate import load_generator, sampling_kwargs

    rows = []
    named = [("AR prior (KV cache)", args.ar)] + [
        ("masked prior" + ("" if len(args.mask) == 1 else f" {i + 1}"), path) for i, path in enumerate(args.mask)]
    for i, (name, path) in enumerate(named):
        if args.untrained:
            prior, sampling = untrained_prior(path, args.codebook_size, args.grid, args.num_classes)
        else:
            prior, _, sampling = load_generator(path)
        if i > 0 and prior.config.mode == "ar":  # an AR prior to compare too (e.g. without guidance): say so
            name = name.replace("masked prior", "AR prior")
            named[i] = (name, path)
        prior = prior.to(device)
        kwargs = sampling_kwargs(sampling, prior)
        for precision in ("fp32", "bf16"):
            # a bf16 copy, so that the fp32 prior stays as loaded
            model = copy.deepcopy(prior).to(device, torch.bfloat16) if precision == "bf16" else prior.to(device)
            labels = torch.arange(64) % prior.config.num_classes if prior.config.num_classes else None
            row = {"prior": name, "path": str(path), "untrained": args.untrained, "precision": precision, "mode": prior.config.mode,
                   "steps": kwargs.get("steps") if prior.config.mode == "mask" else prior.config.seq_len,
                   "guidance_scale": kwargs.get("guidance_scale")}
            row["batch1_ms"] = median_ms(
                lambda r: model.sample(1, None if labels is None else labels[:1], seed=r, **kwargs),
                args.repeats, device)
            row["batch64_ms_per_image"] = median_ms(
                lambda r: model.sample(64, labels, seed=r, batch_size=64, **kwargs),
                max(3, args.repeats // 5), device) / 64
            if prior.config.mode == "mask":
                # one forward over a full grid at batch 2 (the conditional and unconditional halves of guidance)
                tokens = torch.full((2, prior.config.seq_len), model.mask_id, device=device)
                cls = None if labels is None else torch.tensor([0, prior.config.num_classes], device=device)
                row["forward_batch2_ms"] = median_ms(lambda r: model._image_logits(tokens, cls, None),
                                                     3 * args.repeats, device)
            rows.append(row)
            print(f"{name:<22} {precision:<5} batch 1: {row['batch1_ms']:7.1f} ms   batch 64: "
                  f"{row['batch64_ms_per_image']:6.2f} ms/image"
                  + (f"   one forward (batch 2): {row['forward_batch2_ms']:.2f} ms" if "forward_batch2_ms" in row
                     else ""), flush=True)
    best = {name: min(r["batch1_ms"] for r in rows if r["prior"] == name) for name, _ in named}
    ar_ms = best.pop(named[0][0])
    speedups = {name: ar_ms / ms for name, ms in best.items()}
    print(f"\nbatch 1, each prior at its faster precision: AR {ar_ms:.1f} ms, "
          + ", ".join(f"{name} ({path}) {best[name]:.1f} ms: {speedups[name]:.2f}x faster" for name, path in named[1:])
          + " (bar >= 4x)")
    speedup = speedups[named[1][0]]
    # one file per device, so that a GPU run does not overwrite the CPU figures
    name = ("prior_latency_untrained" if args.untrained else "prior_latency") + \
        ("" if device.type == "cpu" else f"_{device.type}")
    write_results(name, rows, mask_vs_ar_batch1_speedup=speedup, vs_ar_batch1_speedups=speedups)


def untrained_prior(spec: str, codebook_size: int, grid: int, num_classes: int):
    """(prior with random weights, sampling settings) from "PRESET [key=value ...]" on a grid x grid token grid."""
    import dataclasses

    from vqkit.models.prior import TokenPrior
    from vqkit.training.config import resolve_config

    preset, *overrides = spec.split()
    cfg = resolve_config(preset=preset, overrides=overrides, kind="prior")
    config = dataclasses.replace(cfg.prior, codebook_size=codebook_size, token_grid=[grid, grid],
                                 num_classes=num_classes or None, text_vocab=None)
    torch.manual_seed(0)
    return TokenPrior(config).eval(), dataclasses.asdict(cfg.sampling)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
