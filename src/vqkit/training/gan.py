"""Training a DCGAN baseline (``vqkit train gan``) with the same Trainer, data and run layout as the tokenizer.

Each training step is ``d_steps`` discriminator updates on the step's real batch, then one generator update. The
GAN is class-conditional with the data's labels when the source has them (``conditioning=auto``): fakes take the
labels of the real batch, so both see the data's class frequencies. Noise is drawn from generators seeded by
(seed, step, rank), so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed as D
from ..data.images import make_grid, save_image
from ..data.sources import SourceError
from ..io import atomic_write_json, read_json
from ..losses.adversarial import GAN_LOSS_KINDS, discriminator_loss, generator_loss
from ..models.gan import DCGAN, DCGANConfig
from .checkpoint import latest_checkpoint
from .config import ConfigError, DataConfig, OptimConfig, config_from_dict, resolve_config
from .run import RUN_CONFIG, open_sources, prepare_run_dir
from .tasks import autocast_context
from .trainer import Trainer, lr_at

CONDITIONING = ("auto", "none", "class")
SPEED_SAMPLES = 500  # images generated to measure samples/s for eval.json


@dataclass
class GANOptimConfig(OptimConfig):
    """DCGAN's Adam settings, a constant learning rate and no clipping."""

    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float = 0.0


@dataclass
class GANTrainConfig:
    model: DCGANConfig = field(default_factory=DCGANConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: GANOptimConfig = field(default_factory=GANOptimConfig)
    loss: str = "hinge"  # hinge | non-saturating
    d_steps: int = 1  # discriminator updates per generator update
    conditioning: str = "auto"  # auto (class labels when the data has them) | none | class
    steps: int = 3000
    batch_size: int = 64
    seed: int = 0
    precision: str = "auto"
    log_every: int = 25
    image_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    eval_batch_size: int = 250  # batch size when sampling for the preview grids and the speed measurement
    preset: str | None = None

    def __post_init__(self):
        if self.loss not in GAN_LOSS_KINDS:
            raise ValueError(f"loss must be one of {GAN_LOSS_KINDS}, got {self.loss!r}")
        if self.d_steps < 1:
            raise ValueError(f"d_steps must be >= 1, got {self.d_steps}")
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {self.conditioning!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_gan_config(data: str | None = None, preset: str | None = None, config_file: str | None = None,
                       overrides: list[str] | None = None) -> GANTrainConfig:
    """Defaults <- preset (named, or chosen from the data source) <- YAML file <- key=value overrides <- --data."""
    return resolve_config(data, preset, config_file, overrides, kind="gan")


def noise(cfg: GANTrainConfig, step: int, draw: int, n: int, latent_dim: int, device: torch.device) -> torch.Tensor:
    """z [n, latent_dim] for the ``draw``-th use of noise in ``step``: a pure function of (seed, step, draw, rank)."""
    g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 31 + draw) * 257 + D.rank())
    return torch.randn(n, latent_dim, generator=g).to(device)


class GANTask:
    """Trains a DCGAN: two Adam optimizers, ``d_steps`` discriminator updates then one generator update per step."""

    progress_keys = ("d_loss", "g_loss", "lr")

    def __init__(self, cfg: GANTrainConfig, model: DCGAN, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = model.to(device)
        self.g_net, self.d_net = self.model.generator, self.model.discriminator
        if D.is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            self.g_net = torch.nn.parallel.DistributedDataParallel(self.model.generator, device_ids=ids)
            self.d_net = torch.nn.parallel.DistributedDataParallel(self.model.discriminator, device_ids=ids)
        o = cfg.optim
        self.g_optimizer, self.d_optimizer = (
            torch.optim.Adam(net.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
            for net in (self.model.generator, self.model.discriminator))
        self.seconds_before = 0.0  # training time of earlier processes of this run (restored on resume)
        self.started = time.time()

    def train_seconds(self) -> float:
        return self.seconds_before + time.time() - self.started

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "g_optimizer": self.g_optimizer.state_dict(),
                "d_optimizer": self.d_optimizer.state_dict(), "train_seconds": self.train_seconds()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.seconds_before, self.started = float(state["train_seconds"]), time.time()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for optimizer in (self.g_optimizer, self.d_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        real = images.to(self.device, non_blocking=True).float()
        classes = labels.to(self.device) if self.model.config.num_classes else None
        latent = self.model.config.latent_dim
        for k in range(cfg.d_steps):
            logs = self.discriminator_step(real, classes, noise(cfg, step, k, len(real), latent, self.device))
        logs.update(self.generator_step(classes, noise(cfg, step, cfg.d_steps, len(real), latent, self.device)))
        return {**logs, "lr": lr}

    def discriminator_step(self, real: torch.Tensor, classes: torch.Tensor | None, z: torch.Tensor) -> dict[str, float]:
        with torch.no_grad(), autocast_context(self.cfg, self.device):
            fake = self.g_net(z, classes).float()
        # one forward over real and fake together (D has no batch statistics, so this equals two passes)
        both_classes = None if classes is None else torch.cat([classes, classes])
        with autocast_context(self.cfg, self.device):
            logits = self.d_net(torch.cat([real, fake]), both_classes).float()
        logits_real, logits_fake = logits.chunk(2)
        d_loss = discriminator_loss(logits_real, logits_fake, self.cfg.loss)
        self._update(self.d_optimizer, self.model.discriminator, d_loss)
        return {"d_loss": float(d_loss.detach()), "logits_real": float(logits_real.detach().mean()),
                "logits_fake": float(logits_fake.detach().mean())}

    def generator_step(self, classes: torch.Tensor | None, z: torch.Tensor) -> dict[str, float]:
        # The plain discriminator, not a DDP wrapper, with its parameters frozen: this pass only carries gradients
        # back to the generator.
        discriminator = self.model.discriminator
        discriminator.requires_grad_(False)
        try:
            with autocast_context(self.cfg, self.device):
                g_loss = generator_loss(discriminator(self.g_net(z, classes), classes).float(), self.cfg.loss)
        finally:
            discriminator.requires_grad_(True)
        self._update(self.g_optimizer, self.model.generator, g_loss)
        return {"g_loss": float(g_loss.detach())}

    def _update(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.grad_clip)
        optimizer.step()

    def preview(self, per_class: int = 8) -> torch.Tensor:
        """A row of ``per_class`` samples for each class (up to 10), or 64 samples; the same noise every time."""
        classes = self.model.config.num_classes
        labels = torch.arange(min(classes, 10)).repeat_interleave(per_class) if classes else None
        n = len(labels) if labels is not None else 8 * per_class
        return self.model.sample(n, labels, seed=0, batch_size=self.cfg.eval_batch_size)

    def write_images(self, out_dir: Path, step: int) -> None:
        save_image(Path(out_dir) / "images" / f"samples_{step:08d}.png", make_grid(self.preview(), nrow=8))

    def samples_per_second(self) -> float:
        started = time.perf_counter()
        self.model.sample(SPEED_SAMPLES, seed=0, batch_size=self.cfg.eval_batch_size)
        return SPEED_SAMPLES / (time.perf_counter() - started)

    def finish(self, out_dir: Path) -> dict | None:
        out_dir = Path(out_dir)
        result = None
        if D.is_main_process():
            self.model.save_pretrained(out_dir)
            result = {"model": "dcgan", "data": self.cfg.data.source, "steps": self.cfg.steps,
                      "train_seconds": round(self.train_seconds(), 1),
                      "parameters": self.model.num_parameters(),
                      "generator_parameters": self.model.num_parameters("generator"),
                      "samples_per_second": round(self.samples_per_second(), 1)}
            atomic_write_json(out_dir / "eval.json", result)
            save_image(out_dir / "samples.png", make_grid(self.preview(), nrow=8))
        D.barrier()
        return result


# ---------------------------------------------------------------------------------------------------- the run
def _resumed_config(out_dir: Path, overrides: dict | None) -> GANTrainConfig:
    saved = out_dir / RUN_CONFIG
    if not saved.is_file() or latest_checkpoint(out_dir / "checkpoints") is None:
        raise ConfigError(f"--resume: {out_dir} holds no run to resume (no {RUN_CONFIG} or no checkpoint)")
    values = read_json(saved, "run config")
    values.update(overrides or {})
    return config_from_dict(values, str(saved), kind="gan")


def _num_classes(cfg: GANTrainConfig, source) -> int | None:
    if cfg.conditioning == "class" and not source.has_labels:
        raise ConfigError(f"{source.name}: conditioning=class, but this source has no labels")
    return source.num_classes if cfg.conditioning != "none" and source.has_labels else None


def train_gan(cfg: GANTrainConfig | None, out_dir: str | Path, resume: bool = False, stop_at: int | None = None,
              progress: bool = True, resume_overrides: dict | None = None) -> dict | None:
    """Train (or resume) a DCGAN into ``out_dir``; returns eval.json's contents (None if stopped early).
    Like ``train_tokenizer``: refuses a directory that already holds a run unless resuming, and on resume the
    saved config wins (``resume_overrides`` such as {"steps": N} aside)."""
    out_dir = Path(out_dir)
    cfg = _resumed_config(out_dir, resume_overrides) if resume else prepare_run_dir(out_dir, cfg, resume=False)
    device = D.init_from_env()
    train_src, test_src = open_sources(cfg)
    if train_src.channels != test_src.channels or train_src.image_size != test_src.image_size:
        raise SourceError(f"{cfg.data.source}: TRAIN and TEST images differ in shape "
                          f"({train_src.channels}x{train_src.image_size} vs {test_src.channels}x{test_src.image_size})")
    height, width = train_src.image_size
    if height != width:
        raise SourceError(f"{cfg.data.source}: the GAN needs square images, got {height}x{width} "
                          f"(set data.image_size to crop or resize them)")
    # the model takes its image shape and classes from the data
    cfg.model = dataclasses.replace(cfg.model, channels=train_src.channels, image_size=int(height),
                                    num_classes=_num_classes(cfg, train_src))
    if D.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_json(out_dir / RUN_CONFIG, cfg.to_dict())
        if progress:
            conditioning = f"{cfg.model.num_classes} classes" if cfg.model.num_classes else "unconditional"
            print(f"data: {train_src.describe()}")
            print(f"model: DCGAN {cfg.model.channels}x{height}x{width}, {conditioning}, {cfg.loss} loss; "
                  f"device {device}; {D.world_size()} process(es)")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    task = GANTask(cfg, DCGAN(cfg.model), device)
    return Trainer(task, cfg, out_dir, train_src, resume=resume, stop_at=stop_at, progress=progress).run()


# ---------------------------------------------------------------------------------------------------------- CLI
def cmd_train_gan(args) -> int:
    out = Path(args.out)
    if args.resume:
        if args.overrides or args.preset or args.config or args.data:
            raise ConfigError("--resume continues the saved run config; only --steps may change it")
        extra = {"steps": args.steps} if args.steps is not None else {}
        result = train_gan(None, out, resume=True, stop_at=args.stop_at, resume_overrides=extra)
    else:
        if not args.data and not args.config:
            raise ConfigError("give --data SOURCE (e.g. mnist5k, a folder, a .npz file) or --config FILE")
        overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
        result = train_gan(resolve_gan_config(args.data, args.preset, args.config, overrides), out,
                           stop_at=args.stop_at)
    if result is None:
        print(f"stopped before the end; continue with: vqkit train gan --out {out} --resume")
        return 0
    print("  " + ", ".join(f"{k}={v}" for k, v in result.items()))
    print(f"GAN saved to {out} (load with vqkit.models.gan.DCGAN.from_pretrained('{out}')); samples in "
          f"{out / 'samples.png'}")
    return 0


def add_train_gan_parser(train_subparsers) -> argparse.ArgumentParser:
    """Add ``gan`` to the subparsers of ``vqkit train``."""
    p = train_subparsers.add_parser(
        "gan", help="train a DCGAN baseline (class-conditional when the data has labels)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a DCGAN-style GAN on the same data as the tokenizer, as a baseline for the tokenizer + "
        "prior pipeline. It is class-conditional (projection discriminator) when the data has labels. DIR then "
        "loads with vqkit.models.gan.DCGAN.from_pretrained(DIR) and samples like a prior.",
        epilog="examples:\n  vqkit train gan --data mnist5k --out runs/gan   # preset mnist-gan (~5 min on a CPU)\n"
        "  vqkit train gan --out runs/gan --resume\n  vqkit train gan --data ~/faces --out runs/faces-gan "
        "data.image_size=64 model.g_channels=64")
    p.add_argument("--data", help="mnist5k | digits | photos | a folder of images | a .npy/.npz file")
    p.add_argument("--out", required=True, help="run directory (model, eval.json, samples.png, metrics.jsonl, "
                   "checkpoints/)")
    p.add_argument("--preset", help="named preset (default: mnist-gan for mnist5k, else none)")
    p.add_argument("--config", help="YAML config file (applied after the preset)")
    p.add_argument("--steps", type=int, help="number of training steps (shorthand for steps=N)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-at", type=int, dest="stop_at", help="stop (with a checkpoint) at this step")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.latent_dim=128")
    p.set_defaults(func=cmd_train_gan)
    return p
