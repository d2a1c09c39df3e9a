"""Where the time of one sampled image goes: the AR prior (KV cache) against the masked prior (parallel steps).

Times ``TokenPrior.sample`` alone (no decoding) for one image (batch 1) and per image at batch 64, with the priors'
own sampling settings (guidance doubles the batch), in fp32 and with the weights cast to bf16, plus one forward pass
of the masked prior over a full grid. Each figure is the median of repeated runs after a warm-up, all in one process,
so read the ratios. On a GPU the same script runs there (``--device cuda``).

    python benchmarks/prior_latency.py --ar runs/bench-generation/prior-ar --mask runs/bench-generation/prior-mask
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
    ap.add_argument("--ar", required=True, help="AR prior directory")
    ap.add_argument("--mask", required=True, help="masked prior directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)

    from vqkit.apps.generate import load_generator, sampling_kwargs

    rows = []
    for name, path in (("AR prior (KV cache)", args.ar), ("masked prior", args.mask)):
        prior, _, sampling = load_generator(path)
        kwargs = sampling_kwargs(sampling, prior)
        for precision in ("fp32", "bf16"):
            # a bf16 copy, so that the fp32 prior stays as loaded
            model = copy.deepcopy(prior).to(device, torch.bfloat16) if precision == "bf16" else prior.to(device)
            labels = torch.arange(64) % prior.config.num_classes if prior.config.num_classes else None
            row = {"prior": name, "path": str(path), "precision": precision, "mode": prior.config.mode,
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
    best = {mode: min(r["batch1_ms"] for r in rows if r["mode"] == mode) for mode in ("ar", "mask")}
    speedup = best["ar"] / best["mask"]
    print(f"\nbatch 1, each prior at its faster precision: AR {best['ar']:.1f} ms, masked {best['mask']:.1f} ms: "
          f"the masked prior is {speedup:.2f}x faster (bar >= 4x)")
    write_results("prior_latency", rows, mask_vs_ar_batch1_speedup=speedup)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
