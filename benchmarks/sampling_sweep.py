"""Sampling settings of a class-conditional prior (temperature, top-k, guidance scale), chosen without TEST.

Each setting generates TRAIN's labels (4000 samples on MNIST-5k). The setting is *chosen* by FD against TRAIN (the
data the prior was fitted to; TEST is never looked at for the choice); FD against TEST is printed beside it only to be
read after the choice, against the FD(TRAIN, TEST) floor. A text-conditional prior (shapes) is chosen by how often
its samples for 500 TRAIN captions match them, and TEST's 500 captions are printed beside. `--seeds 0 1 2` samples
every setting with each seed and chooses by the mean: one seed's FD moves by up to 0.1 on MNIST, as much as
neighbouring settings differ.

    python benchmarks/sampling_sweep.py --prior runs/bench-generation/prior-ar
    python benchmarks/sampling_sweep.py --prior runs/bench-generation/prior-ar --settings 1.0:none:1.0 1.0:20:1.5
    python benchmarks/sampling_sweep.py --prior runs/bench-generation/prior-ar --settings 1.0:none:1.5:0.9
    python benchmarks/sampling_sweep.py --prior runs/bench-generation/prior-mask --settings 1.0:20:2.5:none:linear
    python benchmarks/sampling_sweep.py --prior runs/bench-generation/prior-mask --seeds 0 1 2 --settings 1.0:20:1.5 \
        1.0:20:1.75:none:linear 1.0:20:2.0:none:linear
    python benchmarks/sampling_sweep.py --prior runs/exp/mask --settings 1.0:none:2.0:none:linear+min_p=0.05
    python benchmarks/sampling_sweep.py --prior runs/shapes-words --data shapes --settings 1.0:20:2.0 1.0:20:3.0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import write_results

DEFAULT_SETTINGS = ["1.0:20:1.5", "1.0:none:1.0", "1.0:none:1.5", "1.0:20:1.0", "1.0:none:1.25", "1.0:none:2.0",
                    "0.9:none:1.0"]


def parse_setting(text: str) -> dict:
    """temperature:top_k:guidance_scale[:top_p[:guidance_schedule]], "none" for no top-k / top-p (top-p defaults to
    none, the schedule to constant)."""
    parts = text.split(":")
    if len(parts) not in (3, 4, 5):
        raise SystemExit(f"setting {text!r}: expected temperature:top_k:guidance_scale[:top_p[:guidance_schedule]]")
    temperature, top_k, scale, top_p, schedule = (parts + ["none", "constant"][len(parts) - 3:])[:5]
    return {"temperature": float(temperature), "top_k": None if top_k == "none" else int(top_k),
            "guidance_scale": float(scale), "top_p": None if top_p == "none" else float(top_p),
            "guidance_schedule": schedule}


def mean_over_seeds(per_seed: list[dict], seeds: list[int]) -> dict:
    """One row from one result dict per sampling seed: each figure's mean under its own name, and with several seeds
    the per-seed values as ``<name>_per_seed``."""
    row = {name: sum(r[name] for r in per_seed) / len(per_seed) for name in per_seed[0]}
    if len(seeds) > 1:
        row.update(seeds=list(seeds), **{f"{name}_per_seed": [r[name] for r in per_seed] for name in per_seed[0]})
    return row


def caption_sweep(args, generator_for) -> None:
    """Text-conditional priors: chosen by how often samples match 500 TRAIN captions; TEST's 500 printed beside."""
    from vqkit.apps.sample_eval import evaluate_caption_samples

    rows = []
    for text in args.settings:
        generate, setting = generator_for(text)
        per_seed = []
        for seed in args.seeds:
            train = evaluate_caption_samples(generate, args.data, seed=seed, split="train")
            test = evaluate_caption_samples(generate, args.data, seed=seed, split="test")
            per_seed.append({**{f"train_{k}": v for k, v in train.items() if k.startswith("match")},
                             **{f"test_{k}": v for k, v in test.items() if k.startswith("match")}})
        row = {"setting": text, **setting, **mean_over_seeds(per_seed, args.seeds)}
        rows.append(row)
        print(f"{text:<16} all attributes match: TRAIN captions {100 * row['train_match_all']:5.1f}%  "
              f"TEST captions {100 * row['test_match_all']:5.1f}% (colour {100 * row['test_match_colour']:.1f}%, "
              f"position {100 * row['test_match_position']:.1f}%, shape {100 * row['test_match_shape']:.1f}%)",
              flush=True)
    chosen = max(rows, key=lambda r: r["train_match_all"])
    print(f"\nchosen on TRAIN captions: {chosen['setting']} -> TEST captions {100 * chosen['test_match_all']:.1f}%")
    write_results(args.name or f"sampling_sweep_{Path(args.prior).name}", rows, prior=str(args.prior),
                  chosen=chosen["setting"])


def class_sweep(args, generator_for) -> None:
    """Class-conditional priors: chosen by FD of TRAIN's labels' worth of samples against TRAIN; TEST beside."""
    from vqkit.apps.sample_eval import sample_labels
    from vqkit.data.sources import load_source
    from vqkit.metrics.classifier import fd_floor_of_features, get_classifier, source_tensors
    from vqkit.metrics.fd import frechet_distance

    classifier = get_classifier(args.data)
    train_feats = classifier.features(source_tensors(load_source(args.data, "train"))[0])
    test_feats = classifier.features(source_tensors(load_source(args.data, "test"))[0])
    floor = fd_floor_of_features(train_feats, test_feats)
    labels = sample_labels(args.data)
    rows = []
    for text in args.settings:
        generate, setting = generator_for(text)
        t0 = time.perf_counter()
        per_seed = []
        for seed in args.seeds:
            x = generate(len(labels), {"labels": labels}, seed=seed) * 2 - 1
            feats = classifier.features(x)
            per_seed.append({"class_accuracy": float((classifier.predict(x) == labels).float().mean()),
                             "fd_train": frechet_distance(feats, train_feats),
                             "fd_test": frechet_distance(feats, test_feats)})
        row = {"setting": text, **setting, "num_samples": len(labels), **mean_over_seeds(per_seed, args.seeds),
               "fd_floor": floor, "seconds": time.perf_counter() - t0}
        row["fd_test_over_floor"] = row["fd_test"] / floor
        rows.append(row)
        spread = ""
        if len(args.seeds) > 1:
            train, test = (" / ".join(f"{v:.3f}" for v in row[f"fd_{split}_per_seed"]) for split in ("train", "test"))
            spread = f"  (seeds {' / '.join(map(str, args.seeds))}: TRAIN {train}, TEST {test})"
        print(f"{text:<16} acc {100 * row['class_accuracy']:5.1f}%  FD vs TRAIN {row['fd_train']:.3f}  "
              f"FD vs TEST {row['fd_test']:.3f} ({row['fd_test_over_floor']:.2f}x floor {floor:.3f})  "
              f"{row['seconds']:.0f} s{spread}", flush=True)
    chosen = min(rows, key=lambda r: r["fd_train"])
    over = "" if len(args.seeds) == 1 else f" (mean over seeds {', '.join(map(str, args.seeds))})"
    print(f"\nchosen by FD against TRAIN{over}: {chosen['setting']} -> FD vs TEST {chosen['fd_test']:.3f} "
          f"= {chosen['fd_test_over_floor']:.2f}x the floor, accuracy {100 * chosen['class_accuracy']:.1f}%")
    write_results(args.name or f"sampling_sweep_{Path(args.prior).name}", rows, prior=str(args.prior),
                  chosen=chosen["setting"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", required=True)
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                    help="temperature:top_k|none:guidance_scale[:top_p|none[:constant|linear]][+revisit][+halton]"
                         "[+min_p=P]")
    ap.add_argument("--steps", type=int, default=None, help="mask mode: parallel decoding steps (default: the prior's)")
    ap.add_argument("--revisit", action="store_true", help="mask mode: every setting also with revisit decoding")
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one sampling seed (default 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="several sampling seeds: each setting is judged by the mean over them")
    ap.add_argument("--name", default=None, help="results file name (default: sampling_sweep_<prior folder>)")
    args = ap.parse_args()
    args.seeds = args.seeds or [0 if args.seed is None else args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {args.seeds}")

    from vqkit.apps.generate import load_generator
    from vqkit.apps.sample_eval import prior_generator

    prior, tokenizer, sampling = load_generator(args.prior)

    def generator_for(text: str):
        """The prior's saved sampling settings with this setting (and --steps) applied."""
        base, *flags = text.split("+")
        min_p = {}
        for flag in [f for f in flags if f.startswith("min_p=")]:
            try:
                min_p = {"min_p": float(flag.removeprefix("min_p="))}
            except ValueError:
                raise SystemExit(f"setting {text!r}: {flag!r} is not min_p=<number>") from None
        unknown = {f for f in flags if not f.startswith("min_p=")} - {"revisit", "halton"}
        if unknown:
            raise SystemExit(f"setting {text!r}: unknown flag(s) {sorted(unknown)} (known: +revisit, +halton, "
                             f"+min_p=P)")
        setting = {**sampling, **parse_setting(base), **({"steps": args.steps} if args.steps else {}), **min_p,
                   **({"revisit": True} if "revisit" in flags else {}),
                   **({"order": "halton"} if "halton" in flags else {})}
        return prior_generator(prior, tokenizer, setting), setting

    if args.revisit:
        args.settings = [v for text in args.settings for v in (text, text + "+revisit")]
    (caption_sweep if prior.config.text_vocab else class_sweep)(args, generator_for)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
