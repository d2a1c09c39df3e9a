"""The ``vqkit`` command. Thin on purpose: parse, call the library, print."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

EPILOG_TRAIN = """\
examples:
  vqkit train tokenizer --data mnist5k --out runs/mnist            # the default newcomer run (~10 min on 2 CPU cores)
  vqkit train tokenizer --data photos --out runs/photos --preset photos-vqvae
  vqkit train tokenizer --data ~/my_images --out runs/mine data.image_size=128 steps=20000
  vqkit train tokenizer --out runs/mnist --resume                   # continue an interrupted run exactly
  torchrun --nproc_per_node 4 -m vqkit.cli train tokenizer --data ~/imgs --out runs/ddp

Overrides are dotted keys into the config, e.g. model.codebook_size=1024 optim.lr=2e-4 batch_size=128.
"""


def _add_images_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--images", required=True, help=help_text)


def _add_fid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fid", choices=["inception"],
                   help="also the standard FID: Inception-v3 features of the FID reference (weights file "
                   "pt_inception-2015-12-05-6726825d.pth, never downloaded; looked for in ~/.cache/vqkit and torch "
                   "hub's cache), with its floor FID(TRAIN, TEST) at the same number of images. Slow on a CPU "
                   "(~2-4 min per 1000 images)")
    p.add_argument("--inception-weights", dest="inception_weights", help="path of the FID Inception weights file")


def _error(msg: str) -> int:
    print(f"vqkit: error: {msg}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------------------ train
def cmd_train_tokenizer(args) -> int:
    from .training.config import resolve_config
    from .training.run import train_tokenizer

    out = Path(args.out)
    if args.resume:
        extra = {k: v for k, v in (("steps", args.steps),) if v is not None}
        if args.overrides or args.preset or args.config or args.data:
            return _error("--resume continues the saved run config; only --steps may change it")
        result = train_tokenizer(None, out, resume=True, stop_at=args.stop_at, resume_overrides=extra)
    else:
        if not args.data and not args.config:
            return _error("give --data SOURCE (e.g. mnist5k, photos, a folder, a .npz file) or --config FILE")
        overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
        cfg = resolve_config(args.data, args.preset, args.config, overrides)
        result = train_tokenizer(cfg, out, stop_at=args.stop_at)
    if result is None:
        print(f"stopped before the end; continue with: vqkit train tokenizer --out {out} --resume")
        return 0
    _print_eval(result)
    print(f"model saved to {out} (load with VQModel.from_pretrained('{out}')); evaluation in {out / 'eval.json'}")
    return 0


def cmd_train_prior(args) -> int:
    from .training.config import resolve_config
    from .training.run import train_prior

    out = Path(args.out)
    if args.resume:
        if args.overrides or args.preset or args.config or args.data or args.tokenizer or args.mode or args.teacher:
            return _error("--resume continues the saved run config; only --steps may change it")
        extra = {"steps": args.steps} if args.steps is not None else {}
        result = train_prior(None, None, out, resume=True, stop_at=args.stop_at, resume_overrides=extra)
    else:
        if not args.tokenizer or not args.data:
            return _error("give --tokenizer DIR (a trained tokenizer) and --data SOURCE")
        overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
        overrides += [f"distill_from={args.teacher}"] if args.teacher else []
        cfg = resolve_config(args.data, args.preset, args.config, overrides, kind="prior", mode=args.mode)
        result = train_prior(cfg, args.tokenizer, out, stop_at=args.stop_at)
    if result is None:
        print(f"stopped before the end; continue with: vqkit train prior --out {out} --resume")
        return 0
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    print(f"prior saved to {out}; sample with: vqkit sample --prior {out} --n 64 --out samples.png")
    return 0


def cmd_sample(args) -> int:
    from .apps.generate import decode_samples, load_generator, sampling_kwargs
    from .data.images import make_grid, save_image

    prior, tokenizer, defaults = load_generator(args.prior)
    condition = None
    if args.class_label is not None:
        condition = {"labels": args.class_label}
    if args.text is not None:
        condition = {**(condition or {}), "captions": args.text}
    kwargs = sampling_kwargs(defaults, prior, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             min_p=args.min_p, guidance_scale=args.guidance, guidance_schedule=args.guidance_schedule,
                             steps=args.steps, revisit=args.revisit, order=args.order)
    grids = prior.sample(args.n, condition, seed=args.seed, batch_size=args.batch_size, **kwargs)
    images = decode_samples(tokenizer, grids)
    out = Path(args.out)
    nrow = args.nrow or min(8, args.n)
    if out.suffix.lower() == ".png":
        save_image(out, make_grid(images, nrow=nrow))
        print(f"wrote a grid of {args.n} samples to {out}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            save_image(out / f"sample_{i:05d}.png", im)
        save_image(out / "grid.png", make_grid(images, nrow=nrow))
        print(f"wrote {args.n} samples and grid.png to {out}")
    return 0


def cmd_demo(args) -> int:
    from .apps.demo import run_demo

    summary = run_demo(args.out, progress=True)
    s = summary["samples"]
    print(f"\ndemo finished in {summary['seconds']:.0f} s")
    print(f"  tokenizer  PSNR {summary['tokenizer']['psnr']:.2f} dB, codebook usage "
          f"{100 * summary['tokenizer']['codebook_usage']:.0f}%")
    print(f"  samples    class accuracy {100 * s['class_accuracy']:.1f}%, FD {s['fd']:.2f} "
          f"(floor FD(TRAIN,TEST) {s['fd_floor_train_test']:.2f}; the tokenizer's ceiling, FD of TRAIN's "
          f"reconstructions, {s['fd_tokenizer_ceiling']:.2f}), KID {s['kid']:.4f}")
    print(f"  open {Path(args.out) / 'report.html'}")
    return 0


def cmd_eval_samples(args) -> int:
    from .apps.sample_eval import evaluate_caption_samples, evaluate_class_samples, gan_generator, prior_generator
    from .io import atomic_write_json

    if bool(args.prior) == bool(args.gan):
        return _error("give exactly one of --prior DIR or --gan DIR")
    fid_network = None
    if args.fid == "inception":  # loaded first: missing weights fail before any sampling
        from .metrics.inception import InceptionFeatures

        fid_network = InceptionFeatures(weights=args.inception_weights)
    tokenizer = None
    if args.prior:
        from .apps.generate import load_generator

        prior, tokenizer, sampling = load_generator(args.prior)
        options = dict(guidance_scale=args.guidance, guidance_schedule=args.guidance_schedule,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       steps=args.steps, revisit=args.revisit, order=args.order)
        overrides = {k: v for k, v in options.items() if v is not None}
        generate = prior_generator(prior, tokenizer, {**sampling, **overrides})
        text = prior.config.text_vocab is not None
    else:
        from .models.gan import DCGAN

        generate, text = gan_generator(DCGAN.from_pretrained(args.gan)), False
    if text:
        result = evaluate_caption_samples(generate, args.data or "shapes", num=args.n, seed=args.seed,
                                          fid_network=fid_network)
    else:
        result = evaluate_class_samples(generate, args.data or "mnist5k", per_class=args.per_class, seed=args.seed,
                                        timing=not args.no_timing, tokenizer=tokenizer, fid_network=fid_network)
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _print_eval(r: dict) -> None:
    rows = [("data", f"{r['data']} [{r['split']}], {r['num_images']} images"),
            ("PSNR", f"{r['psnr']:.2f} dB"), ("SSIM", f"{r['ssim']:.4f}"),
            ("codebook usage", f"{100 * r['codebook_usage']:.1f}% ({r['codes_used']}/{r['codebook_size']})"),
            ("perplexity", f"{r['perplexity']:.1f}"),
            ("LPIPS (VGG)", f"{r['lpips_vgg']:.4f}" if "lpips_vgg" in r
             else f"not computed: {r.get('lpips_note', 'turned off')}"),
            ("tokens", f"{r['token_grid'][0]}x{r['token_grid'][1]}"), ("bits/image", f"{r['bits_per_image']:.0f}")]
    for key in ("fd_classifier", "fd_effnet_lite0"):
        if key in r:
            floor = f" (floor FD(TRAIN, TEST) {r['fd_floor_train_test']:.3f})" if "fd_floor_train_test" in r else ""
            rows.append((f"recon. {key}", f"{r[key]:.3f}{floor}"))
    if "fid_inception" in r:
        floor = f" (floor FID(TRAIN, TEST) {r['fid_inception_floor']:.3f} at the same size)" \
            if "fid_inception_floor" in r else ""
        rows.append(("recon. fid_inception", f"{r['fid_inception']:.3f}{floor}"))
    if "train_seconds" in r:
        rows.append(("training time", f"{r['train_seconds']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


# ----------------------------------------------------------------------------------------------- use a tokenizer
def _load_model(path: str):
    import torch

    from .models.tokenizer import VQModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return VQModel.from_pretrained(path, device=device)


def _collect_images(spec: str, channels: int, split: str = "test", strict: bool = False):
    """(names, list of float [C,H,W] in [0,1]) from an image file, a folder, or a data source name/array file."""
    import torch

    from .data.images import read_image, to_channels
    from .data.sources import NAMED_SOURCES, SourceError, load_source

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() not in (".npy", ".npz"):
        arr = to_channels(read_image(path), channels)
        return [path.stem], [torch.from_numpy(arr).permute(2, 0, 1).float()]
    if path.is_dir():
        from .data.folder import IMAGE_EXTENSIONS

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise SourceError(f"{path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        names, images = [], []
        for f in files:
            try:
                arr = to_channels(read_image(f), channels)
            except SourceError as e:
                if strict:
                    raise
                warnings.warn(f"skipping {e}")
                continue
            names.append(f.relative_to(path).with_suffix("").as_posix().replace("/", "__"))
            images.append(torch.from_numpy(arr).permute(2, 0, 1).float())
        return names, images
    if spec in NAMED_SOURCES or path.suffix.lower() in (".npy", ".npz"):
        src = load_source(spec, split)
        if src.channels != channels:
            raise SourceError(f"{spec}: {src.channels}-channel images, but the tokenizer takes {channels}")
        return [f"{src.name}_{split}_{i:05d}" for i in range(len(src))], [(src[i][0] + 1) / 2 for i in range(len(src))]
    raise SourceError(f"{spec}: no such image file, folder or data source")


def _batches(images, batch_size: int):
    """Group consecutive images of equal size into batches (folders may mix sizes)."""
    import torch

    i = 0
    while i < len(images):
        j = i + 1
        while j < len(images) and j - i < batch_size and images[j].shape == images[i].shape:
            j += 1
        yield i, torch.stack(images[i:j])
        i = j


def cmd_reconstruct(args) -> int:
    import torch

    from .data.images import save_image
    from .metrics import psnr_per_image

    model = _load_model(args.model)
    names, images = _collect_images(args.images, model.config.in_channels, args.split)
    if args.limit:
        names, images = names[: args.limit], images[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start, x in _batches(images, args.batch_size):
        dev = next(model.parameters()).device
        y = model.detokenize(model.tokenize(x.to(dev)), size=tuple(x.shape[-2:])).cpu()
        psnr = psnr_per_image(x, y)
        for k in range(len(x)):
            name = names[start + k]
            save_image(out / f"{name}.png", torch.cat([x[k], y[k]], dim=-1))  # original | reconstruction
            rows.append({"image": name, "psnr": round(float(psnr[k]), 3)})
    (out / "psnr.csv").write_text("image,psnr\n" + "".join(f"{r['image']},{r['psnr']}\n" for r in rows))
    for r in rows[: args.show]:
        print(f"  {r['image']:<40} {r['psnr']:6.2f} dB")
    if len(rows) > args.show:
        print(f"  ... ({len(rows) - args.show} more in {out / 'psnr.csv'})")
    mean = sum(r["psnr"] for r in rows) / max(1, len(rows))
    print(f"{len(rows)} images, mean PSNR {mean:.2f} dB; side-by-side PNGs (original | reconstruction) in {out}")
    return 0


def cmd_encode(args) -> int:
    import numpy as np
    import torch

    from .io import atomic_save_safetensors, atomic_write_json

    model = _load_model(args.model)
    names, images = _collect_images(args.images, model.config.in_channels, args.split)
    grids = []
    for _, x in _batches(images, args.batch_size):
        grids.append(model.tokenize(x.to(next(model.parameters()).device)).cpu())
    shapes = {tuple(g.shape[-2:]) for g in grids}
    out = Path(args.out)
    meta = {"model": str(Path(args.model).resolve()), "codebook_size": model.config.codebook_size,
            "names": names, "image_sizes": [list(im.shape[-2:]) for im in images]}
    if len(shapes) > 1 and out.suffix != ".safetensors":
        return _error(f"images of different sizes give token grids of different shapes {sorted(shapes)}; "
                      f"write them to a .safetensors file (one tensor per image)")
    if out.suffix == ".npy":
        tokens = torch.cat(grids).numpy().astype(np.int64)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.npy")
        np.save(tmp, tokens)
        tmp.replace(out)
        atomic_write_json(out.with_suffix(".json"), meta)
        print(f"wrote {tokens.shape[0]} token grids {tuple(tokens.shape[1:])} to {out} (names in {out.with_suffix('.json')})")
    elif out.suffix == ".safetensors":
        flat = torch.cat([g.reshape(-1, *g.shape[-2:]) for g in grids]) if len(shapes) == 1 else None
        tensors = {"tokens": flat} if flat is not None else {
            f"tokens/{i}": t for i, t in enumerate(t for g in grids for t in g)}
        atomic_save_safetensors(out, tensors, metadata={"vqkit_tokens": json.dumps(meta)})
        print(f"wrote {len(names)} token grids to {out}")
    else:
        return _error(f"--out must end in .npy or .safetensors, got {out.name}")
    return 0


def _read_tokens(path: Path):
    import numpy as np
    import torch

    from .io import read_json, read_safetensors, read_safetensors_metadata

    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable token file ({e})") from None
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: expected integer token grids [N, h, w], got {arr.dtype} {arr.shape}")
        side = path.with_suffix(".json")
        meta = read_json(side) if side.is_file() else {}
        return list(torch.from_numpy(arr.astype(np.int64))), meta
    if path.suffix == ".safetensors":
        tensors = read_safetensors(path)
        meta = json.loads(read_safetensors_metadata(path).get("vqkit_tokens", "{}"))
        if "tokens" in tensors:
            return list(tensors["tokens"].long()), meta
        keys = sorted((k for k in tensors if k.startswith("tokens/")), key=lambda k: int(k.split("/")[1]))
        if not keys:
            raise ValueError(f"{path}: no 'tokens' tensor in this file")
        return [tensors[k].long() for k in keys], meta
    raise ValueError(f"{path}: token files are .npy or .safetensors")


def cmd_decode(args) -> int:
    from .data.images import save_image

    model = _load_model(args.model)
    grids, meta = _read_tokens(Path(args.tokens))
    names = meta.get("names") or [f"{i:05d}" for i in range(len(grids))]
    sizes = meta.get("image_sizes") or [None] * len(grids)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device
    for grid, name, size in zip(grids, names, sizes):
        y = model.detokenize(grid[None].to(dev), size=tuple(size) if size else None)[0].cpu()
        save_image(out / f"{name}.png", y)
    print(f"decoded {len(grids)} token grids to PNGs in {out}")
    return 0


def cmd_eval_tokenizer(args) -> int:
    from .data.sources import load_source
    from .evaluation import evaluate_tokenizer

    fid_network = None
    if args.fid == "inception":  # loaded first: missing weights fail before any work is done
        from .metrics.inception import InceptionFeatures

        fid_network = InceptionFeatures(weights=args.inception_weights)
    model = _load_model(args.model)
    source = load_source(args.data, args.split)
    if source.channels != model.config.in_channels:
        return _error(f"{args.data}: {source.channels}-channel images, but the tokenizer takes {model.config.in_channels}")
    floor_images = None
    if fid_network is not None:
        from .metrics.classifier import source_tensors

        floor_images = source_tensors(load_source(args.data, "train" if args.split == "test" else "test"))[0]
    result = evaluate_tokenizer(model, source, args.batch_size, progress=True, feature_distance=not args.no_fd,
                                fid_network=fid_network, fid_floor_images=floor_images,
                                lpips=None if args.no_lpips else "auto")
    _print_eval(result)
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


def cmd_info(args) -> int:
    from .io import read_json
    from .training.checkpoint import list_checkpoints

    model = _load_model(args.dir)
    c = model.config
    h, w = c.token_grid()
    print(f"{args.dir}: vqkit VQModel, {model.num_parameters() / 1e6:.2f} M parameters")
    print(f"  images       {c.in_channels} channel(s), trained at {c.image_size} px; downsampling x{c.downsample_factor}")
    print(f"  tokens       {h}x{w} per image, K={c.codebook_size} codes -> {c.bits_per_image():.0f} bits/image")
    q = "EMA" if c.use_ema else "codebook loss"
    extra = (", cosine" if c.cosine else "") + (f", {c.codebook_dim}-d codes" if c.codebook_dim else "")
    print(f"  quantizer    {q}, beta={c.beta}{extra}")
    ev = Path(args.dir) / "eval.json"
    if ev.is_file():
        print("  evaluation (eval.json):")
        _print_eval(read_json(ev))
    ckpts = list_checkpoints(Path(args.dir) / "checkpoints")
    if ckpts:
        print(f"  checkpoints  {len(ckpts)}, latest {ckpts[-1].name}")
    return 0


# ------------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .training.config import list_presets

    p = argparse.ArgumentParser(prog="vqkit", description="Discrete image tokenizers (VQ-VAE, VQGAN): train, "
                                "evaluate, tokenize and reconstruct images.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"vqkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a model", description="Train a model.")
    tsub = train.add_subparsers(dest="what", metavar="WHAT")
    tt = tsub.add_parser("tokenizer", help="train a VQ-VAE tokenizer", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Train a VQ-VAE image tokenizer; DIR then loads with VQModel.from_pretrained(DIR). "
                         f"Presets: {', '.join(list_presets())}.", epilog=EPILOG_TRAIN)
    tt.add_argument("--data", help="mnist5k | digits | photos | a folder of images | a .npy/.npz file")
    tt.add_argument("--out", required=True, help="run directory (model, eval.json, metrics.jsonl, checkpoints/)")
    tt.add_argument("--preset", help="named preset (default: chosen from the data source)")
    tt.add_argument("--config", help="YAML config file (applied after the preset)")
    tt.add_argument("--steps", type=int, help="number of training steps (shorthand for steps=N)")
    tt.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tt.add_argument("--stop-at", type=int, dest="stop_at", help="stop (with a checkpoint) at this step")
    tt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.codebook_size=1024")
    tt.set_defaults(func=cmd_train_tokenizer)

    tp = tsub.add_parser("prior", help="train a transformer prior over a tokenizer's token grids",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Train a TokenPrior (autoregressive or MaskGIT-style masked) on the token grids "
                         "that a trained tokenizer gives the data. Class labels or captions condition it when the "
                         "data has them (conditioning=auto). The prior's directory records its tokenizer, so "
                         "'vqkit sample --prior DIR' needs nothing else.",
                         epilog="examples:\n  vqkit train prior --tokenizer runs/mnist --data mnist5k --out runs/prior\n"
                         "  vqkit train prior --tokenizer runs/mnist --data mnist5k --out runs/prior-mask --mode mask\n"
                         "  vqkit train prior --tokenizer runs/mnist --data mnist5k --out runs/prior-mask --mode mask "
                         "--teacher runs/prior  # distilled\n"
                         "  vqkit train prior --tokenizer runs/shapes-tok --data shapes --out runs/shapes-prior  # text")
    tp.add_argument("--tokenizer", help="trained tokenizer directory")
    tp.add_argument("--data", help="data source (as for the tokenizer)")
    tp.add_argument("--out", required=True, help="run directory for the prior")
    tp.add_argument("--mode", choices=["ar", "mask"], help="autoregressive (default) or masked (MaskGIT)")
    tp.add_argument("--preset", help="named preset (default: <data>-prior-<mode> if it exists, else prior-<mode>)")
    tp.add_argument("--config", help="YAML config file (applied after the preset)")
    tp.add_argument("--steps", type=int, help="number of training steps")
    tp.add_argument("--teacher", help="a trained prior over the same tokenizer: also train on its samples "
                    "(distill_from=DIR; distill_samples=N grids, default ten times TRAIN's)")
    tp.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tp.add_argument("--stop-at", type=int, dest="stop_at", help="stop (with a checkpoint) at this step")
    tp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. prior.n_layers=8")
    tp.set_defaults(func=cmd_train_prior)

    from .training.gan import add_train_gan_parser

    add_train_gan_parser(tsub)

    sm = sub.add_parser("sample", help="generate images with a trained prior",
                        description="Sample token grids from a prior and decode them with its tokenizer. A .png --out "
                        "gets a grid; any other --out is a folder that gets one PNG per sample plus grid.png.")
    sm.add_argument("--prior", required=True, help="prior directory")
    sm.add_argument("--class", type=int, dest="class_label", help="class label to generate (class-conditional priors)")
    sm.add_argument("--text", help="caption to generate from (text-conditional priors)")
    sm.add_argument("--n", type=int, default=64, help="number of samples")
    sm.add_argument("--seed", type=int, default=0, help="random seed (same seed, same samples)")
    sm.add_argument("--out", required=True, help="grid .png, or a folder")
    sm.add_argument("--temperature", type=float)
    sm.add_argument("--top-k", type=int, dest="top_k")
    sm.add_argument("--top-p", type=float, dest="top_p")
    sm.add_argument("--min-p", type=float, dest="min_p",
                    help="drop tokens less likely than this times the most likely one")
    sm.add_argument("--guidance", type=float, help="classifier-free guidance scale (1: off)")
    sm.add_argument("--guidance-schedule", choices=["constant", "linear", "linear_tokens"], dest="guidance_schedule",
                    help="linear: ramp the guidance scale up from 1 over the decoding steps; linear_tokens: over "
                         "the share of tokens decoded (the same for AR priors)")
    sm.add_argument("--steps", type=int, help="parallel decoding steps (masked priors)")
    sm.add_argument("--revisit", action="store_true", default=None,
                    help="masked priors: let decoded tokens be re-masked (for priors trained with input_noise)")
    sm.add_argument("--order", choices=["confidence", "halton"],
                    help="masked priors: keep the most confident tokens each step, or decode in a spread-out order")
    sm.add_argument("--batch-size", type=int, default=64, dest="batch_size")
    sm.add_argument("--nrow", type=int, default=0, help="images per grid row")
    sm.set_defaults(func=cmd_sample)

    rec = sub.add_parser("reconstruct", help="tokenize and decode images; side-by-side PNGs and per-image PSNR",
                         description="Tokenize and reconstruct images; writes original|reconstruction PNGs and psnr.csv.")
    rec.add_argument("--model", required=True, help="tokenizer directory")
    _add_images_arg(rec, "an image file, a folder (recursive), or a data source (its TEST split)")
    rec.add_argument("--out", required=True, help="output folder")
    rec.add_argument("--split", default="test", choices=["train", "test"], help="split when --images is a data source")
    rec.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    rec.add_argument("--batch-size", type=int, default=64, dest="batch_size")
    rec.add_argument("--show", type=int, default=10, help="how many per-image PSNRs to print")
    rec.set_defaults(func=cmd_reconstruct)

    enc = sub.add_parser("encode", help="images -> token grids (.npy or .safetensors)",
                         description="Tokenize images into integer token grids [N, h, w].")
    enc.add_argument("--model", required=True, help="tokenizer directory")
    _add_images_arg(enc, "an image file, a folder (recursive), or a data source (its TEST split)")
    enc.add_argument("--out", required=True, help="tokens.npy (plus tokens.json with names) or tokens.safetensors")
    enc.add_argument("--split", default="test", choices=["train", "test"])
    enc.add_argument("--batch-size", type=int, default=64, dest="batch_size")
    enc.set_defaults(func=cmd_encode)

    dec = sub.add_parser("decode", help="token grids -> PNG images", description="Decode token grids into PNGs.")
    dec.add_argument("--model", required=True, help="tokenizer directory")
    dec.add_argument("--tokens", required=True, help=".npy or .safetensors written by 'vqkit encode'")
    dec.add_argument("--out", required=True, help="output folder")
    dec.set_defaults(func=cmd_decode)

    ev = sub.add_parser("eval", help="evaluate a model", description="Evaluate a model.")
    esub = ev.add_subparsers(dest="what", metavar="WHAT")
    et = esub.add_parser("tokenizer", help="PSNR, SSIM, codebook usage, perplexity, bits/image on a held-out split")
    et.add_argument("--model", required=True, help="tokenizer directory")
    et.add_argument("--data", required=True, help="data source (as for training)")
    et.add_argument("--split", default="test", choices=["train", "test"])
    et.add_argument("--batch-size", type=int, default=250, dest="batch_size")
    et.add_argument("--no-fd", action="store_true", dest="no_fd",
                    help="skip the reconstruction FD (it trains vqkit's classifier once, ~1-2 min, then caches it)")
    et.add_argument("--no-lpips", action="store_true", dest="no_lpips",
                    help="skip LPIPS (by default it is computed when its weights are on this machine)")
    et.add_argument("--json", help="also write the results to this JSON file")
    _add_fid_args(et)
    et.set_defaults(func=cmd_eval_tokenizer)

    es = esub.add_parser("samples", help="class accuracy, FD/KID vs TEST (with the floor), samples/s of a generator",
                         description="Evaluate generated images with vqkit's classifier (trained on TRAIN only): "
                         "class-conditional accuracy, FD and KID against TEST beside the FD(TRAIN, TEST) floor, "
                         "samples per second; for text-conditional priors on 'shapes', the share of samples whose "
                         "measured colour, position and shape match their caption.")
    es.add_argument("--prior", help="prior directory")
    es.add_argument("--gan", help="GAN directory (vqkit train gan)")
    es.add_argument("--data", help="data set the generator was trained on (default mnist5k; shapes for text)")
    es.add_argument("--per-class", type=int, dest="per_class",
                    help="samples per class (default: TRAIN's labels, so the samples match TRAIN in number and class "
                    "mix; FD's floor is always taken at the samples' size)")
    es.add_argument("--n", type=int, default=500, help="captions to sample (text-conditional)")
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--guidance", type=float, help="classifier-free guidance scale (prior)")
    es.add_argument("--guidance-schedule", choices=["constant", "linear", "linear_tokens"], dest="guidance_schedule",
                    help="linear: ramp the guidance scale up from 1 over the decoding steps, linear_tokens: "
                         "over the tokens (prior)")
    es.add_argument("--temperature", type=float)
    es.add_argument("--top-k", type=int, dest="top_k")
    es.add_argument("--top-p", type=float, dest="top_p")
    es.add_argument("--min-p", type=float, dest="min_p",
                    help="drop tokens less likely than this times the most likely one")
    es.add_argument("--steps", type=int, help="parallel decoding steps (masked prior)")
    es.add_argument("--revisit", action="store_true", default=None,
                    help="masked prior: let decoded tokens be re-masked (for priors trained with input_noise)")
    es.add_argument("--order", choices=["confidence", "halton"],
                    help="masked prior: keep the most confident tokens each step, or decode in a spread-out order")
    es.add_argument("--no-timing", action="store_true", dest="no_timing", help="skip the latency measurements")
    es.add_argument("--json", help="also write the results to this JSON file")
    _add_fid_args(es)
    es.set_defaults(func=cmd_eval_samples)

    demo = sub.add_parser("demo", help="the whole pipeline on MNIST-5k in one command (~15 min on 2 CPU cores)",
                          description="Train a tokenizer and a class-conditional prior on MNIST-5k, sample every "
                          "class, evaluate the samples and write DIR/report.html. Re-running with the same --out "
                          "reuses finished stages.")
    demo.add_argument("--out", required=True, help="output folder (DIR/tokenizer, DIR/prior, DIR/report.html)")
    demo.set_defaults(func=cmd_demo)

    from .interop.taming import add_convert_parser

    add_convert_parser(sub)

    from .report import add_report_parser

    add_report_parser(sub)

    info = sub.add_parser("info", help="describe a model directory", description="Describe a model directory.")
    info.add_argument("dir", help="model directory")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data.sources import SourceError
    from .io import VQKitFileError
    from .training.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # `vqkit train` / `vqkit eval` without WHAT: show that command's help
        if args.command:
            parser.parse_args([args.command, "--help"])
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (SourceError, VQKitFileError, ConfigError, FileNotFoundError, ValueError) as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
