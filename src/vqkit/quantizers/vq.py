"""VectorQuantizer: one module in, quantized tensor + indices + loss out.

Options, each off or on independently:
- codebook + commitment loss (the VQ-VAE paper: ||sg[z] - e||^2 + beta ||z - sg[e]||^2, beta = 0.25 on the
  *commitment* term; taming's legacy default and diffusers put beta on the codebook term instead);
- EMA codebook updates (decay, Laplace smoothing) instead of the codebook loss;
- k-means initialisation of the codebook from the first training batch;
- dead-code restart: a code unused for ``dead_code_window`` training steps is re-seeded from a current encoder output;
- l2-normalised (cosine) codes and a low-dimensional code space (factorised codes, ViT-VQGAN / LlamaGen): features are
  projected D -> codebook_dim, looked up there, and projected back.

All quantisation runs in fp32, also under bf16 autocast. Under torch.distributed the EMA statistics, k-means init and
restarts are synchronised so that every rank holds the same codebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from .nearest import DEFAULT_BLOCK_ELEMENTS, nearest_code


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, D, h, w], straight-through gradient to the input
    indices: torch.Tensor  # int64 [B, h, w]
    loss: torch.Tensor  # scalar: codebook + beta * commitment (or beta * commitment with EMA)
    stats: dict = field(default_factory=dict)  # floats: perplexity, usage, restarted, ...


def kmeans(x: torch.Tensor, k: int, iters: int = 10, cosine: bool = False) -> torch.Tensor:
    """Lloyd's k-means on rows of x [N, d] (fp32), using the global torch RNG for the initial centres."""
    n = x.shape[0]
    if n >= k:
        centres = x[torch.randperm(n, device=x.device)[:k]].clone()
    else:  # fewer vectors than codes: repeat with a little noise; dead-code restarts sort out the rest
        centres = x[torch.randint(n, (k,), device=x.device)] + 1e-3 * torch.randn(k, x.shape[1], device=x.device)
    if cosine:
        centres = F.normalize(centres, dim=1)
    for _ in range(iters):
        idx, _ = nearest_code(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        used = counts > 0
        centres[used] = sums[used] / counts[used].unsqueeze(1)
        if cosine:
            centres = F.normalize(centres, dim=1)
    return centres


def histogram_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(perplexity, usage fraction) of a code histogram."""
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).double().mean())


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        beta: float = 0.25,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_window: int = 0,
        cosine: bool = False,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim or dim
        self.beta = beta
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_window = dead_code_window
        self.cosine = cosine
        self.block_elements = block_elements

        projected = self.codebook_dim != dim
        self.in_proj = nn.Linear(dim, self.codebook_dim) if projected else nn.Identity()
        self.out_proj = nn.Linear(self.codebook_dim, dim) if projected else nn.Identity()

        init = torch.empty(codebook_size, self.codebook_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if cosine:
            init = F.normalize(torch.randn(codebook_size, self.codebook_dim), dim=1)
        # With EMA the codebook is moved by running averages, not by the optimizer.
        self.codebook = nn.Parameter(init, requires_grad=not use_ema)
        if use_ema:
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        self.register_buffer("initialized", torch.tensor(0 if kmeans_init else 1, dtype=torch.long))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))

    # ----------------------------------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The code vectors [K, codebook_dim] as used for the search (normalised when cosine)."""
        cb = self.codebook.float()
        return F.normalize(cb, dim=1) if self.cosine else cb

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        z = self.in_proj(flat)
        return F.normalize(z, dim=1) if self.cosine else z

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for a token grid: int [B, h, w] -> float [B, D, h, w] (what the decoder consumes)."""
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"token indices must lie in [0, {self.codebook_size - 1}]; got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        with torch.autocast(device_type=indices.device.type, enabled=False):
            q = self.out_proj(self.codes()[indices.long()])
        return q.permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects [B, {self.dim}, h, w], got {tuple(z.shape)}")
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)
            zp = self._project(flat)
            if self.training and not bool(self.initialized):
                self._kmeans_init(zp.detach())
            idx, _ = nearest_code(zp.detach(), self.codes(), block_elements=self.block_elements)
            q = self.codes()[idx]

            commitment = F.mse_loss(zp, q.detach())
            if self.use_ema:
                codebook_loss = torch.zeros((), device=z.device)
                loss = self.beta * commitment
            else:
                codebook_loss = F.mse_loss(q, zp.detach())
                loss = codebook_loss + self.beta * commitment

            q_st = zp + (q - zp).detach()  # straight-through: forward = code, backward = identity
            out = self.out_proj(q_st).view(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()

            counts = torch.bincount(idx, minlength=self.codebook_size).float()
            restarted = 0
            if self.training:
                counts = D.all_reduce_sum(counts)
                if self.use_ema:
                    self._ema_update(zp.detach(), idx, counts)
                restarted = self._restart_dead_codes(zp.detach(), counts)
                self.steps += 1

        perplexity, usage = histogram_stats(counts)
        stats = {
            "perplexity": perplexity,
            "usage": usage,
            "commitment_loss": float(commitment.detach()),
            "codebook_loss": float(codebook_loss.detach()),
            "restarted": float(restarted),
        }
        return QuantizerOutput(out, idx.view(b, h, w), loss, stats)

    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _kmeans_init(self, zp: torch.Tensor) -> None:
        # Rank 0 clusters the vectors of all ranks and broadcasts the result, so every rank starts identical.
        data = D.all_gather_cat(zp)
        centres = kmeans(data, self.codebook_size, self.kmeans_iters, self.cosine) if D.is_main_process() else (
            torch.empty(self.codebook_size, self.codebook_dim, device=zp.device))
        D.broadcast(centres)
        self.codebook.data.copy_(centres)
        if self.use_ema:
            self.ema_sum.copy_(centres)
            self.ema_count.fill_(1.0)
        self.initialized.fill_(1)

    @torch.no_grad()
    def _ema_update(self, zp: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        sums = D.all_reduce_sum(torch.zeros_like(self.ema_sum).index_add_(0, idx, zp))
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
        new = self.ema_sum / smoothed.unsqueeze(1)
        self.codebook.data.copy_(F.normalize(new, dim=1) if self.cosine else new)

    @torch.no_grad()
    def _restart_dead_codes(self, zp: torch.Tensor, counts: torch.Tensor) -> int:
        self.last_used[counts > 0] = self.steps
        if self.dead_code_window <= 0:
            return 0
        dead = (self.steps - self.last_used) >= self.dead_code_window
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        # Counts are all-reduced, so every rank sees the same dead set; rank 0 picks the replacements.
        pick = torch.randint(zp.shape[0], (n_dead,), device=zp.device)
        fresh = zp[pick].clone()
        D.broadcast(fresh)
        if self.cosine:
            fresh = F.normalize(fresh, dim=1)
        self.codebook.data[dead] = fresh
        if self.use_ema:
            level = self.ema_count.mean().clamp_min(1.0)
            self.ema_count[dead] = level
            self.ema_sum[dead] = fresh * level
        self.last_used[dead] = self.steps
        return n_dead

    def extra_repr(self) -> str:
        return (f"K={self.codebook_size}, dim={self.dim}, codebook_dim={self.codebook_dim}, beta={self.beta}, "
                f"ema={self.use_ema}, kmeans_init={self.kmeans_init}, dead_code_window={self.dead_code_window}, "
                f"cosine={self.cosine}")


def bits_per_token(codebook_size: int) -> float:
    return math.log2(codebook_size)
