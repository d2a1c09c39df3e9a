"""Tasks the Trainer runs. A task owns its modules and optimizers and does one training step at a time."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..data.images import make_grid, save_image
from ..data.sources import ImageSource
from ..evaluation import evaluate_tokenizer
from ..io import atomic_write_json
from ..metrics import psnr_per_image
from ..models.tokenizer import VQModel
from .config import TrainConfig
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

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        x = images.to(self.device, non_blocking=True).float()
        with autocast_context(cfg, self.device):
            out = self.net(x)
            rec = out.reconstruction.float()
            rec_loss = reconstruction_loss(cfg.loss, rec, x)
            loss = rec_loss + out.quantizer_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            psnr = psnr_per_image((x + 1) / 2, ((rec + 1) / 2).clamp(0, 1)).mean()
        return {"loss": float(loss.detach()), "rec_loss": float(rec_loss.detach()), "q_loss": float(out.quantizer_loss.detach()),
                "psnr": float(psnr), "usage": out.stats["usage"], "perplexity": out.stats["perplexity"],
                "restarted": out.stats["restarted"], "lr": lr}

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
