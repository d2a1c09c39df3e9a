"""`vqkit demo`: the whole pipeline on MNIST-5k in one command, sized for 2 CPU cores (at most ~15 minutes).

Trains a tokenizer, then a class-conditional autoregressive prior over its tokens, samples every class, evaluates the
samples with vqkit's own classifier (trained on TRAIN only), and writes an HTML report:
DIR/tokenizer, DIR/prior, DIR/samples.png, DIR/eval_samples.json, DIR/report.html.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io import atomic_write_json


def run_demo(out: str | Path, data: str = "mnist5k", progress: bool = True, tokenizer_overrides: list[str] | None = None,
             prior_overrides: list[str] | None = None, per_class: int | None = None) -> dict:
    """The demo into ``out``; finished stages (a run folder with eval.json) are reused. The overrides (key=value, as
    on the command line) and ``per_class`` (samples per class in the evaluation; default: as many as TRAIN
    has) exist for quick checks."""
    from ..data.images import make_grid, save_image
    from ..training.config import resolve_config
    from ..training.run import train_prior, train_tokenizer
    from .generate import load_generator
    from .sample_eval import evaluate_class_samples, prior_generator

    out = Path(out)
    started = time.time()
    tok_dir, prior_dir = out / "tokenizer", out / "prior"

    def stage(n: int, text: str) -> None:
        if progress:
            print(f"\n[{n}/4] {text}  ({time.time() - started:.0f} s so far)", flush=True)

    stage(1, f"training the tokenizer on {data} -> {tok_dir}")
    tok_eval = (_read_eval(tok_dir) if (tok_dir / "eval.json").is_file() else
                train_tokenizer(resolve_config(data, preset="mnist-demo-tokenizer", overrides=tokenizer_overrides),
                                tok_dir, progress=progress))
    stage(2, f"training a class-conditional prior over its tokens -> {prior_dir}")
    prior_eval = (_read_eval(prior_dir) if (prior_dir / "eval.json").is_file() else
                  train_prior(resolve_config(data, preset="mnist-demo-prior", kind="prior", overrides=prior_overrides),
                              tok_dir, prior_dir, progress=progress))
    stage(3, "sampling every class and evaluating the samples")
    prior, tokenizer, sampling = load_generator(prior_dir)
    generate = prior_generator(prior, tokenizer, sampling)
    labels = torch.arange(prior.config.num_classes).repeat_interleave(10)
    save_image(out / "samples.png", make_grid(generate(len(labels), {"labels": labels}, seed=0), nrow=10))
    sample_eval = evaluate_class_samples(generate, data, per_class=per_class, progress=progress, tokenizer=tokenizer)
    atomic_write_json(out / "eval_samples.json", sample_eval)
    stage(4, "writing the report")
    from ..report import write_report

    extra = {f"Samples ({sample_eval['num_samples']}, as many as TRAIN per class unless set; classifier trained on "
             f"TRAIN only; FD floor at the same number of images)": [
        {"method": f"VQ-VAE + {prior.config.mode.upper()} prior", **{k: v for k, v in sample_eval.items()
                                                                      if isinstance(v, (int, float))}}]}
    write_report([tok_dir, prior_dir], out / "report.html", title="vqkit demo: MNIST-5k", extra_tables=extra)
    summary = {"seconds": round(time.time() - started, 1), "tokenizer": tok_eval, "prior": prior_eval,
               "samples": sample_eval}
    atomic_write_json(out / "demo.json", summary)
    return summary


def _read_eval(run: Path) -> dict:
    from ..io import read_json

    return read_json(run / "eval.json", "evaluation")
