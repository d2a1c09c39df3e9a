"""Tasks the Trainer runs. A task owns its modules and optimizers and does one training step at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..data.augment import augment_images
from ..losses.adversarial import disc_augment
from ..data.images import make_grid, save_image
from ..data.sources import ImageSource
from ..evaluation import evaluate_tokenizer
from ..io import atomic_write_json
from ..metrics import psnr_per_image
from ..models.tokenizer import VQModel
from .config import TrainConfig
from .ema import WeightEMA
from .trainer import lr_at


def reconstruction_loss(kind: str, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if kind == "l2":
        return F.mse_loss(rec, x)
    if kind == "l1":
        return F.l1_loss(rec, x)
    if kind == "l1+l2":
        return F.l1_loss(rec, x) + F.mse_loss(rec, x)
    raise ValueError(f"loss must be l1, l2 or l1+l2, got {kind!r}")


def autocast_context(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Rows of originals, each followed by the row of their reconstructions (all in [0, 1])."""
    rows = []
    for s in range(0, len(originals), per_row):
        rows += [originals[s:s + per_row], reconstructions[s:s + per_row]]
    return torch.cat(rows)


class TokenizerTask:
    """Trains a VQModel with a reconstruction loss plus the quantizer's loss (the VQ-VAE objective)."""

    progress_keys = ("loss", "psnr", "usage", "lr")

    def __init__(self, cfg: TrainConfig, model: VQModel, device: torch.device, test_source: ImageSource):
        self.cfg, self.device, self.test_source = cfg, device, test_source
        self.model = model.to(device)
        self.net = self.model
        if D.is_distributed():
            # Buffers are not broadcast: the quantizer synchronises its own codebook statistics, and broadcasting
            # rank 0's buffers every step would hide a desynchronisation instead of preventing it.
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        o = cfg.optim
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                          betas=tuple(o.betas), weight_decay=o.weight_decay)
        n = min(32, len(test_source))
        self.preview = torch.stack([test_source[i][0] for i in range(n)])
        self.started = time.time()
        self.perceptual = None
        if cfg.perceptual.kind != "none":
            from ..losses.perceptual import build_perceptual

            options = dict(cfg.perceptual.options)
            if cfg.perceptual.kind == "classifier":  # trained on (and cached for) the source this tokenizer learns
                options.setdefault("dataset", cfg.data.source)
            # rank 0 first: a classifier term trains its network into the cache once, the other ranks then load it
            self.perceptual = D.main_process_first(lambda: build_perceptual(cfg.perceptual.kind, **options)).to(device)
        self.gan = _GAN(cfg, model.config.out_channels, device) if cfg.gan.enabled else None

    def state(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.gan is not None:
            state["gan"] = self.gan.state()
        return state

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.gan is not None:
            self.gan.load_state(state["gan"])

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        x = images.to(self.device, non_blocking=True).float()
        x = augment_images(x, hflip=cfg.augment.hflip, channel_permute=cfg.augment.channel_permute, seed=cfg.seed,
                           step=step, rank=D.rank())
        logs: dict[str, float] = {}
        with autocast_context(cfg, self.device):
            out = self.net(x)
            rec = out.reconstruction.float()
            rec_loss = reconstruction_loss(cfg.loss, rec, x)
            nll = rec_loss
            if self.perceptual is not None:
                p_loss = self.perceptual(rec, x).mean()
                nll = nll + cfg.perceptual.weight * p_loss
                logs["p_loss"] = float(p_loss.detach())
            loss = nll + out.quantizer_loss
            if self.gan is not None:
                self.gan.step = step
            if self.gan is not None and step >= cfg.gan.gen_start:
                g_term, g_logs = self.gan.generator_term(rec, nll, self.model.decoder.last_layer)
                loss = loss + g_term
                logs.update(g_logs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        if self.gan is not None and step >= cfg.gan.disc_start:
            logs.update(self.gan.discriminator_step(x, rec.detach(), lr_at(step, cfg) * self.gan.lr_scale))
        with torch.no_grad():
            psnr = psnr_per_image((x + 1) / 2, ((rec + 1) / 2).clamp(0, 1)).mean()
        return {"loss": float(loss.detach()), "rec_loss": float(rec_loss.detach()), "q_loss": float(out.quantizer_loss.detach()),
                "psnr": float(psnr), "usage": out.stats["usage"], "perplexity": out.stats["perplexity"],
                "restarted": out.stats["restarted"], "lr": lr, **logs}

    @torch.no_grad()
    def reconstruct_preview(self) -> torch.Tensor:
        x = (self.preview.to(self.device) + 1) / 2
        y = self.model.detokenize(self.model.tokenize(x), size=tuple(x.shape[-2:]))
        return comparison_grid(x.cpu(), y.cpu())

    def write_images(self, out_dir: Path, step: int) -> None:
        save_image(Path(out_dir) / "images" / f"reconstructions_{step:08d}.png", make_grid(self.reconstruct_preview(), nrow=8))

    def finish(self, out_dir: Path) -> dict | None:
        out_dir = Path(out_dir)
        result = None
        if D.is_main_process():
            self.model.save_pretrained(out_dir)
            result = evaluate_tokenizer(self.model, self.test_source, self.cfg.eval_batch_size, progress=True)
            result["train_seconds"] = round(time.time() - self.started, 1)
            result["steps"] = self.cfg.steps
            result["parameters"] = self.model.num_parameters()
            atomic_write_json(out_dir / "eval.json", result)
            save_image(out_dir / "reconstructions.png", make_grid(self.reconstruct_preview(), nrow=8))
        D.barrier()
        return result


class _GAN:
    """The VQGAN adversarial part: a PatchGAN discriminator with its own optimizer, the generator's adaptive-weighted
    term, and optional LeCam / R1 regularisation. Its start steps for D and for the generator term are separate."""

    def __init__(self, cfg: TrainConfig, channels: int, device: torch.device):
        from ..losses.adversarial import LeCamRegularizer, parse_disc_augment
        from ..models.discriminator import PatchDiscriminator

        g = cfg.gan
        if g.loss not in ("hinge", "non-saturating"):
            raise ValueError(f"gan.loss must be hinge or non-saturating, got {g.loss!r}")
        self.cfg, self.device = cfg, device
        self.disc = PatchDiscriminator(channels, g.disc_channels, g.disc_layers, g.disc_norm).to(device)
        self.net = self.disc
        if D.is_distributed():
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.disc, device_ids=[device.index] if device.type == "cuda" else None)
        self.lr_scale = (g.lr / cfg.optim.lr) if g.lr else 1.0
        self.optimizer = torch.optim.Adam(self.disc.parameters(), lr=g.lr or cfg.optim.lr, betas=tuple(cfg.optim.betas))
        self.lecam = LeCamRegularizer().to(device) if g.lecam > 0 else None
        self.augment = parse_disc_augment(g.augment)
        self.step = 0

    def _augmented(self, images: torch.Tensor, salt: int) -> torch.Tensor:
        """DiffAugment draws for this (seed, step, rank) and call site, so that a resumed run repeats them exactly."""
        if not self.augment:
            return images
        seed = ((int(self.cfg.seed) * 1_000_003 + self.step) * 1_009 + D.rank()) * 7 + salt
        return disc_augment(images, self.augment, torch.Generator().manual_seed(seed))

    def state(self) -> dict:
        state = {"disc": self.disc.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.lecam is not None:
            state["lecam"] = self.lecam.state_dict()
        return state

    def load_state(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lecam is not None:
            self.lecam.load_state_dict(state["lecam"])

    def generator_term(self, rec: torch.Tensor, nll: torch.Tensor, last_layer: torch.Tensor):
        from ..losses.adversarial import adaptive_generator_weight, generator_loss

        g = self.cfg.gan
        # The plain module, not the DDP wrapper: this pass only carries gradients back to the generator, and D's
        # parameters get none from it (their grads are cleared before D's own step).
        for p in self.disc.parameters():
            p.requires_grad_(False)
        try:
            g_loss = generator_loss(self.disc(self._augmented(rec, salt=0)), g.loss)
        finally:
            for p in self.disc.parameters():
                p.requires_grad_(True)
        if g.adaptive_weight:
            d_weight = adaptive_generator_weight(nll, g_loss, last_layer, max_weight=g.max_weight) * g.weight
        else:
            d_weight = torch.tensor(g.weight, device=rec.device)
        return d_weight * g_loss, {"g_loss": float(g_loss.detach()), "d_weight": float(d_weight)}

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, lr: float) -> dict[str, float]:
        from ..losses.adversarial import hinge_d_loss, r1_penalty, vanilla_d_loss

        g = self.cfg.gan
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        real = real.detach().requires_grad_(g.r1 > 0)
        with autocast_context(self.cfg, self.device):
            logits_real = self.net(self._augmented(real, salt=1)).float()
            logits_fake = self.net(self._augmented(fake.detach(), salt=2)).float()
        d_loss = (hinge_d_loss if g.loss == "hinge" else vanilla_d_loss)(logits_real, logits_fake)
        total = d_loss
        logs = {"d_loss": float(d_loss.detach()), "logits_real": float(logits_real.detach().mean()),
                "logits_fake": float(logits_fake.detach().mean())}
        if self.lecam is not None:
            reg = self.lecam(logits_real, logits_fake)
            total = total + g.lecam * reg
            logs["lecam"] = float(reg.detach())
        if g.r1 > 0:
            r1 = r1_penalty(logits_real, real)
            total = total + 0.5 * g.r1 * r1
            logs["r1"] = float(r1.detach())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return logs


class PriorTask:
    """Trains a TokenPrior on token grids of a fixed tokenizer (AR next-token or MaskGIT masked-token objective)."""

    progress_keys = ("loss", "acc", "lr")

    def __init__(self, cfg, prior, tokenizer: VQModel, device: torch.device, train_tokens, test_tokens,
                 reference=None):
        self.cfg, self.device = cfg, device
        self.reference = reference  # with cfg.cca_weight: the frozen prior that alignment fine-tuning starts from
        self.prior = prior.to(device)
        self.tokenizer = tokenizer.to(device).eval()
        self.train_tokens, self.test_tokens = train_tokens, test_tokens
        self.net = self.prior
        if D.is_distributed():
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.prior, device_ids=[device.index] if device.type == "cuda" else None)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.prior.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        self.ema = WeightEMA(self.prior, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.started = time.time()

    @property
    def final_prior(self):
        """The weights that are saved, evaluated and sampled from: the moving average when there is one."""
        return self.ema.averaged if self.ema is not None else self.prior

    def state(self) -> dict:
        state = {"prior": self.prior.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state()
        return state

    def load_state(self, state: dict) -> None:
        self.prior.load_state_dict(state["prior"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state(state["ema"])

    def train_step(self, tokens: torch.Tensor, rows: torch.Tensor, step: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.prior.train()
        condition = self.train_tokens.condition(rows)
        with autocast_context(cfg, self.device):
            if self.reference is not None:
                out = self.prior.alignment_loss(self.reference, tokens.to(self.device), condition,
                                                weight=cfg.cca_weight, beta=cfg.cca_beta,
                                                schedule=cfg.cca_schedule)
            else:
                out = self.net(tokens.to(self.device), condition)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.prior.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.prior)
        return {"loss": float(out.loss.detach()), "acc": float(out.accuracy), "lr": lr}

    def preview_condition(self, n_per: int = 8):
        """A condition per preview row: every class (up to 10), or the first TEST captions, or none."""
        c = self.prior.config
        if c.num_classes:
            labels = torch.arange(min(c.num_classes, 10)).repeat_interleave(n_per)
            return {"labels": labels}, len(labels)
        if c.text_vocab and self.test_tokens.captions:
            caps = [cap for cap in self.test_tokens.captions[:4] for _ in range(n_per)]
            return {"captions": caps}, len(caps)
        return None, 4 * n_per

    @torch.no_grad()
    def sample_images(self, seed: int = 0) -> torch.Tensor:
        from ..apps.generate import decode_samples, sampling_kwargs

        prior = self.final_prior
        condition, n = self.preview_condition()
        grids = prior.sample(n, condition, seed=seed, **sampling_kwargs(self.cfg.sampling, prior))
        return decode_samples(self.tokenizer, grids)

    def write_images(self, out_dir: Path, step: int) -> None:
        save_image(Path(out_dir) / "images" / f"samples_{step:08d}.png", make_grid(self.sample_images(), nrow=8))

    def finish(self, out_dir: Path) -> dict | None:
        out_dir = Path(out_dir)
        result = None
        if D.is_main_process():
            self.final_prior.save_pretrained(out_dir)
            atomic_write_json(out_dir / "sampling.json", dataclasses.asdict(self.cfg.sampling))
            result = self.evaluate()
            result["train_seconds"] = round(time.time() - self.started, 1)
            result["steps"] = self.cfg.steps
            result["parameters"] = self.prior.num_parameters()
            atomic_write_json(out_dir / "eval.json", result)
            save_image(out_dir / "samples.png", make_grid(self.sample_images(), nrow=8))
        D.barrier()
        return result

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out token loss: AR, and mask mode trained on Halton masks, give exact bits per image (-sum log2 p);
        mask mode with random masks its masked-token loss (it has no exact likelihood)."""
        prior = self.final_prior.eval()
        tokens, rows = self.test_tokens.tensors()
        bs = self.cfg.eval_batch_size
        if prior.config.mode == "ar" or prior.config.train_masks == "halton":
            total = 0.0
            for s in range(0, len(tokens), bs):
                lp = prior.log_prob(tokens[s:s + bs].to(self.device), self.test_tokens.condition(rows[s:s + bs]))
                total += float(lp.double().sum())
            bits = -total / math.log(2) / len(tokens)
            return {"mode": prior.config.mode, "test_bits_per_image": bits,
                    "test_bits_per_token": bits / tokens[0].numel(),
                    "num_images": len(tokens)}
        g = torch.Generator(device=self.device).manual_seed(0)
        losses = []
        for s in range(0, len(tokens), bs):
            out = prior(tokens[s:s + bs].to(self.device), self.test_tokens.condition(rows[s:s + bs]), generator=g)
            losses.append(float(out.loss) * (min(bs, len(tokens) - s)))
        return {"mode": "mask", "test_masked_token_loss": sum(losses) / len(tokens), "num_images": len(tokens)}
