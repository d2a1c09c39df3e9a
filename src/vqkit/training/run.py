"""Entry points that set up and run a training job (used by the CLI and by tests)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from .. import distributed as D
from ..data.sources import NAMED_SOURCES, ImageSource, SourceError, load_source
from ..io import atomic_write_json, read_json
from ..models.tokenizer import VQModel
from .checkpoint import latest_checkpoint
from .config import ConfigError, TrainConfig, config_from_dict
from .tasks import TokenizerTask
from .trainer import Trainer

RUN_CONFIG = "train_config.json"


def open_sources(cfg: TrainConfig) -> tuple[ImageSource, ImageSource]:
    """TRAIN and TEST splits of the configured data, with only the options the source accepts."""
    d = cfg.data
    options = {k: v for k, v in dict(image_size=d.image_size, channels=d.channels).items() if v is not None}
    if d.source not in NAMED_SOURCES:  # folders and arrays take the file-handling options too
        options.update(resize=d.resize, strict=d.strict)
    else:
        accepted = inspect.signature(NAMED_SOURCES[d.source]).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            extra = sorted(set(options) - set(accepted))
            if extra:
                raise ConfigError(f"data source {d.source!r} takes no option(s) {extra} (set them to null)")
    return load_source(d.source, "train", **options), load_source(d.source, "test", **options)


def prepare_run_dir(out_dir: Path, cfg: TrainConfig | None, resume: bool, overrides: dict | None = None) -> TrainConfig:
    """Validate the output directory; on resume, the saved config (with ``overrides`` such as steps) wins."""
    saved = out_dir / RUN_CONFIG
    if resume:
        if not saved.is_file() or latest_checkpoint(out_dir / "checkpoints") is None:
            raise ConfigError(f"--resume: {out_dir} holds no run to resume (no {RUN_CONFIG} or no checkpoint)")
        d = read_json(saved, "run config")
        for k, v in (overrides or {}).items():
            d[k] = v
        return config_from_dict(d, str(saved))
    if saved.exists() or latest_checkpoint(out_dir / "checkpoints") is not None:
        raise ConfigError(f"{out_dir} already holds a training run; continue it with --resume or choose another --out "
                          f"(nothing there is overwritten)")
    assert cfg is not None
    return cfg


def write_run_config(out_dir: Path, config: dict, resume: bool) -> None:
    """The run's train_config.json (rank 0; not on resume, where the saved one stays): what marks a folder as a run."""
    if D.is_main_process() and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / RUN_CONFIG, config)


def train_tokenizer(cfg: TrainConfig | None, out_dir: str | Path, resume: bool = False, stop_at: int | None = None,
                    progress: bool = True, resume_overrides: dict | None = None) -> dict | None:
    """Train (or resume) a tokenizer into ``out_dir``; returns the TEST evaluation (None if stopped early)."""
    out_dir = Path(out_dir)
    cfg = prepare_run_dir(out_dir, cfg, resume, resume_overrides)
    device = D.init_from_env()
    train_src, test_src = open_sources(cfg)
    if train_src.channels != test_src.channels or train_src.image_size != test_src.image_size:
        raise SourceError(f"{cfg.data.source}: TRAIN and TEST images differ in shape "
                          f"({train_src.channels}x{train_src.image_size} vs {test_src.channels}x{test_src.image_size})")
    # the model takes its input shape from the data
    cfg.model = dataclasses.replace(cfg.model, in_channels=train_src.channels, out_channels=train_src.channels,
                                    image_size=int(train_src.image_size[0]))
    if D.is_main_process() and progress:
        print(f"data: {train_src.describe()}; {test_src.describe()}")
        print(f"model: {cfg.model.token_grid()[0]}x{cfg.model.token_grid()[1]} tokens, K={cfg.model.codebook_size}, "
              f"{cfg.model.bits_per_image():.0f} bits/image; device {device}; {D.world_size()} process(es)")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = VQModel(cfg.model)
    task = TokenizerTask(cfg, model, device, test_src)
    # The run's config is written only once everything it names could be built (a perceptual network whose weights
    # are missing, say): a failed start leaves no run behind that a corrected command would refuse to overwrite.
    write_run_config(out_dir, cfg.to_dict(), resume)
    return Trainer(task, cfg, out_dir, train_src, resume=resume, stop_at=stop_at, progress=progress).run()


def caption_words(cfg, train_tokens, test_tokens, text_vocab: str | None) -> list[str] | None:
    """The word vocabulary of a "words" prior: TRAIN's words (kept from the saved config on resume). TEST captions
    with other words would fail at evaluation, and captions longer than max_text_len would be cut: both refused."""
    if text_vocab != "words":
        return None
    from ..models.text import split_words, word_vocabulary

    words = cfg.prior.text_words or word_vocabulary(train_tokens.captions)
    known = set(words)
    unseen = sorted({w for c in test_tokens.captions for w in split_words(c)} - known)
    if unseen:
        raise ConfigError(f"{cfg.data.source}: TEST captions use words that no TRAIN caption has ({', '.join(unseen[:20])}); "
                          f"use prior.text_vocab=bytes for open-vocabulary captions")
    longest = max(len(split_words(c)) for c in [*train_tokens.captions, *test_tokens.captions]) + 2
    if longest > cfg.prior.max_text_len:
        raise ConfigError(f"{cfg.data.source}: the longest caption takes {longest} word tokens (BOS and EOS included), "
                          f"more than prior.max_text_len={cfg.prior.max_text_len}; raise it")
    return words


def load_initial_weights(prior, init_dir: str | Path, tokenizer_dir: str | Path, verbose: bool = True) -> None:
    """Copy a trained prior's weights into ``prior`` (``init_from``). Both must belong to the same tokenizer and have
    the same parameter names and shapes; anything else is refused with what differs."""
    from ..apps.generate import load_prior_of_tokenizer

    source = load_prior_of_tokenizer(init_dir, tokenizer_dir, "init_from")
    theirs, ours = source.state_dict(), prior.state_dict()
    if source.config.mode == "ar" and prior.config.mode == "mask" and "pos_emb" in theirs and "pos_emb" in ours:
        # An AR sequence has one more position (its start token). Its hidden state at position p (the condition's
        # positions, then the start token and the image tokens) predicts image token p - len(condition); a masked
        # prior predicts each token at that token's own position, so the first positions line up by what they predict.
        theirs["pos_emb"] = theirs["pos_emb"][:len(ours["pos_emb"])]
    differ = sorted(k for k in set(theirs) | set(ours)
                    if k not in theirs or k not in ours or theirs[k].shape != ours[k].shape)
    if differ:
        raise ConfigError(f"init_from={init_dir}: its parameters do not fit this prior's (different sizes or "
                          f"conditioning): {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}")
    prior.load_state_dict(theirs)
    if verbose:
        print(f"initialised from {init_dir} ({source.config.mode} prior)")


def train_prior(cfg, tokenizer_dir: str | Path, out_dir: str | Path, resume: bool = False,
                stop_at: int | None = None, progress: bool = True, resume_overrides: dict | None = None) -> dict | None:
    """Train (or resume) a TokenPrior over the tokens that ``tokenizer_dir`` gives the configured data."""
    from ..apps.generate import choose_conditioning, record_tokenizer_path, token_set, with_teacher_samples
    from ..models.prior import TokenPrior
    from .tasks import PriorTask

    out_dir = Path(out_dir)
    if resume:
        saved = out_dir / RUN_CONFIG
        if not saved.is_file() or latest_checkpoint(out_dir / "checkpoints") is None:
            raise ConfigError(f"--resume: {out_dir} holds no run to resume (no {RUN_CONFIG} or no checkpoint)")
        d = read_json(saved, "run config")
        tokenizer_dir = d.pop("tokenizer_dir")
        d.update(resume_overrides or {})
        cfg = config_from_dict(d, str(saved), kind="prior")
    else:
        prepare_run_dir(out_dir, cfg, resume=False)
    device = D.init_from_env()
    tokenizer = VQModel.from_pretrained(tokenizer_dir, device=device)
    train_src, test_src = open_sources(cfg)
    if train_src.channels != tokenizer.config.in_channels:
        raise SourceError(f"{cfg.data.source}: {train_src.channels}-channel images, but the tokenizer in "
                          f"{tokenizer_dir} takes {tokenizer.config.in_channels}")
    conditioning = choose_conditioning(cfg.conditioning, train_src)
    cache = out_dir / "tokens"
    if D.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        # tokenize once, on rank 0
        token_set(tokenizer, train_src, conditioning, cache / "train.safetensors", progress, cfg.shift_radius)
        token_set(tokenizer, test_src, conditioning, cache / "test.safetensors", progress)
    D.barrier()
    train_tokens = token_set(tokenizer, train_src, conditioning, cache / "train.safetensors", progress,
                             cfg.shift_radius)
    test_tokens = token_set(tokenizer, test_src, conditioning, cache / "test.safetensors", progress)
    if cfg.distill_from:
        n = cfg.distill_samples or 10 * len(train_tokens)
        distilled = None
        if D.is_main_process():  # sampled once, on rank 0; the other ranks read its cache
            distilled = with_teacher_samples(train_tokens, cfg.distill_from, tokenizer_dir, n,
                                             cache / "distill.safetensors", cfg.seed, progress, device=device)
        D.barrier()
        if distilled is None:
            distilled = with_teacher_samples(train_tokens, cfg.distill_from, tokenizer_dir, n,
                                             cache / "distill.safetensors", cfg.seed, progress)
        train_tokens = distilled
    h, w = train_tokens.tokens.shape[-2:]
    text_vocab = (cfg.prior.text_vocab or "bytes") if conditioning == "text" else None
    cfg.prior = dataclasses.replace(
        cfg.prior, codebook_size=tokenizer.config.codebook_size, token_grid=[int(h), int(w)],
        num_classes=train_src.num_classes if conditioning == "class" else None, text_vocab=text_vocab,
        text_words=caption_words(cfg, train_tokens, test_tokens, text_vocab),
        tokenizer=record_tokenizer_path(out_dir, Path(tokenizer_dir)))
    if D.is_main_process() and progress:
        print(f"tokens: {train_tokens.describe()}; {test_tokens.describe()}")
        print(f"prior: {cfg.prior.mode}, {cfg.prior.n_layers} layers x {cfg.prior.d_model}; device {device}")
    torch.manual_seed(cfg.seed)
    prior = TokenPrior(cfg.prior)
    if cfg.init_from and not resume:
        load_initial_weights(prior, cfg.init_from, tokenizer_dir, progress and D.is_main_process())
    reference = None
    if cfg.cca_weight > 0:  # the frozen prior to align against, read again on resume (it never changes)
        from ..apps.generate import load_prior_of_tokenizer

        if D.is_distributed():
            raise ConfigError("cca_weight > 0 runs on one process only (its loss does not go through "
                              "DistributedDataParallel)")
        if conditioning not in ("class", "text"):
            raise ConfigError("cca_weight > 0 aligns a prior with its conditions, but this run is unconditional")
        reference = load_prior_of_tokenizer(cfg.init_from, tokenizer_dir, "init_from", device).requires_grad_(False)
    task = PriorTask(cfg, prior, tokenizer, device, train_tokens, test_tokens, reference=reference)
    write_run_config(out_dir, {"tokenizer_dir": str(Path(tokenizer_dir).resolve()), **cfg.to_dict()}, resume)
    return Trainer(task, cfg, out_dir, train_tokens, resume=resume, stop_at=stop_at, progress=progress).run()
