"""TokenPrior: a transformer prior over the token grids of a VQ tokenizer, with class and/or caption conditioning.

One decoder-style transformer serves two modes (``TokenPriorConfig.mode``):

* ``"ar"``: raster-order autoregressive. Causal attention over ``[prefix, start, x_0, ..., x_{L-2}]``; the output at
  the start token predicts x_0, the output at x_i predicts x_{i+1}. Sampling decodes one token per forward pass,
  reusing cached keys and values.
* ``"mask"`` (MaskGIT): bidirectional attention over ``[prefix, x_0, ..., x_{L-1}]`` where some x_i are [MASK].
  Training masks a random fraction of the tokens (cosine-scheduled by default) and scores only those; sampling
  starts from an all-[MASK] grid and fixes the most confident tokens over a few parallel steps.

The prefix holds the condition: a class token (``num_classes``) and/or ``max_text_len`` caption tokens
(``text_vocab``, see ``vqkit.models.text``), each with its own embedding table; ``class_at_every_token`` also adds the
class embedding to every image token's input (``text_at_every_token``: the mean caption-token embedding). Training
replaces the condition by the null class / the empty caption with probability ``cond_dropout``, so that one model
also gives the unconditional logits that classifier-free guidance needs. Losses are on image tokens only.

Token grids come in as int64 [B, h, w] (what ``VQModel.tokenize`` returns) or flattened [B, h*w] in raster order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pretrained import PretrainedMixin, config_from_dict
from .text import TEXT_VOCABS, make_text_tokenizer

CONFIG_VERSION = 1
MODES = ("ar", "mask")
TRAIN_MASKS = ("random", "halton")
MASK_ATTENTIONS = ("bidirectional", "group_causal")
# MaskGIT's mask schedules gamma(r): the share of tokens still masked after a share r of the decoding steps
MASK_SCHEDULES = ("cosine", "square", "cubic", "quartic", "linear")


# ------------------------------------------------------------------------------------------------------------ config
@dataclass
class TokenPriorConfig:
    """Everything needed to rebuild a TokenPrior. Saved as config.json; ``config_version`` guards future changes."""

    mode: str = "ar"  # "ar" (autoregressive, raster order) or "mask" (MaskGIT)
    codebook_size: int = 512  # K: image tokens are 0..K-1
    token_grid: list[int] = field(default_factory=lambda: [7, 7])  # (h, w) of the tokenizer's grid
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    mlp: str = "gelu"  # "gelu" or "swiglu"
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    positions: str = "learned"  # "learned" (absolute) or "rope" (rotary, in attention)
    dropout: float = 0.0
    tie_weights: bool = True  # the output head reuses the image-token embedding
    num_classes: int | None = None  # class-conditional when set
    text_vocab: str | None = None  # caption-conditional when set ("bytes" or "words")
    text_words: list[str] | None = None  # text_vocab "words": its vocabulary (training reads it from TRAIN's captions)
    max_text_len: int = 64  # caption tokens in the prefix, BOS and EOS included
    cond_dropout: float = 0.1  # training: probability of the null class / empty caption (for guidance)
    # Also add the class embedding to every image token's input, not only as the prefix token. Measured on MNIST
    # (K=64, no guidance): 9.1% of the prefix-only prior's samples were the wrong digit, 7.2% with this.
    class_at_every_token: bool = False
    # Likewise for captions: add the mean embedding of the caption's tokens (BOS and EOS included, PAD not) to every
    # image token's input. No new parameters; the empty caption gives the null summary, so guidance works as before.
    text_at_every_token: bool = False
    # Cross-entropy label smoothing. (Until stop 22 the default was "0.1 in mask mode", but every prior built from a
    # config got 0.0: the config merge froze defaults derived from another field, fixed since in the merge. All
    # masked priors measured in docs/experiments.md trained with 0.0, so that is now the default in both modes.)
    label_smoothing: float = 0.0
    # Training only: each input image token is replaced by a uniformly random code with this probability (ar: the
    # teacher-forced inputs; mask: the visible tokens, which are then scored as well), the targets stay the true
    # tokens. A model that has seen wrong tokens in its context learns to recover from its own sampling mistakes
    # instead of compounding them; a mask-mode model also learns to judge visible tokens (``revisit`` sampling).
    input_noise: float = 0.0
    # Mask mode, training: "random" draws MaskGIT's masks (a cosine-scheduled share of random positions), so the
    # model must learn every decoding order; "halton" draws only the masks that ``train_mask_steps``-step decoding in
    # Halton order meets (sample with order "halton" and as many steps), so it learns those few conditionals, as an
    # AR prior learns its one order, while tokens decoded together still sit far apart.
    train_masks: str = "random"
    train_mask_steps: int = 8
    # Mask mode with Halton masks: "bidirectional" runs one forward pass per training mask (the masked grid), so a
    # training grid teaches the one decoding step its mask begins (plus guesses at the later groups that sampling
    # never uses). "group_causal" teaches all the steps of a grid in one pass, as teacher forcing does for an AR
    # prior: the sequence is [prefix, the grid's tokens, one query per position], a token attends to the tokens of
    # its own and earlier Halton groups, a query to those of earlier groups only (and to itself), and the query of
    # position i predicts token i. Sampling then runs the same 8 steps with cached keys and values.
    mask_attention: str = "bidirectional"
    # Mask mode: how many tokens stay masked after each decoding step, gamma(t / steps) of them (MaskGIT): "cosine"
    # cos(pi/2 r), "square" 1 - r^2, "cubic" 1 - r^3, "quartic" 1 - r^4, "linear" 1 - r. A steeper start (cubic)
    # decodes the first tokens one at a time, as an AR prior does, and leaves the larger groups for when much of the
    # grid is known.
    # Training masks (random and Halton) follow it too, so a prior is sampled with the schedule it was trained on.
    mask_schedule: str = "cosine"
    # Group-causal priors: draw the tokens of each decoding group from a mixture of this many products instead of
    # one product (0: off). A plain head draws the tokens of a group independently given the earlier groups, so two
    # tokens drawn in the same step cannot agree with each other beyond what their context already fixes. The mixture
    # first draws one of ``group_mixture`` components from the group's context, then every token of the group given
    # it, so the component carries what the group's tokens share (see ``GroupMixture``). Same forward passes; the
    # likelihood stays exact (the component is summed out).
    group_mixture: int = 0
    tokenizer: str | None = None  # the VQ tokenizer these tokens come from (a path, set by the caller)
    config_version: int = CONFIG_VERSION

    def __post_init__(self):
        self.token_grid = [int(s) for s in self.token_grid]
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if len(self.token_grid) != 2 or min(self.token_grid) < 1:
            problems.append(f"token_grid must be [h, w] with h, w >= 1, got {self.token_grid}")
        if self.codebook_size < 2:
            problems.append(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        elif self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            problems.append("rotary positions need an even head dimension (d_model / n_heads)")
        if self.mlp not in ("gelu", "swiglu"):
            problems.append(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.positions not in ("learned", "rope"):
            problems.append(f"positions must be 'learned' or 'rope', got {self.positions!r}")
        if self.num_classes is not None and self.num_classes < 1:
            problems.append(f"num_classes must be >= 1 or None, got {self.num_classes}")
        if self.text_vocab is not None and self.text_vocab not in TEXT_VOCABS:
            problems.append(f"text_vocab must be one of {TEXT_VOCABS} or None, got {self.text_vocab!r}")
        if self.max_text_len < 2:
            problems.append(f"max_text_len must be >= 2 (BOS and EOS), got {self.max_text_len}")
        if not 0 <= self.cond_dropout < 1 or not 0 <= self.label_smoothing < 1 or not 0 <= self.input_noise < 1:
            problems.append("cond_dropout, label_smoothing and input_noise must be in [0, 1)")
        if self.train_masks not in TRAIN_MASKS:
            problems.append(f"train_masks must be one of {TRAIN_MASKS}, got {self.train_masks!r}")
        if self.train_mask_steps < 1:
            problems.append(f"train_mask_steps must be >= 1, got {self.train_mask_steps}")
        if self.mask_schedule not in MASK_SCHEDULES:
            problems.append(f"mask_schedule must be one of {MASK_SCHEDULES}, got {self.mask_schedule!r}")
        if self.mask_attention not in MASK_ATTENTIONS:
            problems.append(f"mask_attention must be one of {MASK_ATTENTIONS}, got {self.mask_attention!r}")
        elif self.mask_attention == "group_causal" and (self.mode != "mask" or self.train_masks != "halton"):
            problems.append("mask_attention 'group_causal' needs mode 'mask' and train_masks 'halton' (it follows "
                            "the Halton decoding order)")
        if self.group_mixture < 0:
            problems.append(f"group_mixture must be >= 0, got {self.group_mixture}")
        elif self.group_mixture and self.mask_attention != "group_causal":
            problems.append("group_mixture needs mask_attention 'group_causal' (it mixes over the tokens of one "
                            "decoding group)")
        if problems:
            raise ValueError("invalid TokenPriorConfig: " + "; ".join(problems))

    @property
    def seq_len(self) -> int:
        """Image tokens per grid (h * w)."""
        return self.token_grid[0] * self.token_grid[1]

    @property
    def group_causal(self) -> bool:
        return self.mask_attention == "group_causal"

    @property
    def prefix_len(self) -> int:
        """Positions before the first image token: class token, caption tokens and (ar) the start token."""
        return (self.num_classes is not None) + (self.max_text_len if self.text_vocab else 0) + (self.mode == "ar")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TokenPriorConfig":
        return config_from_dict(cls, d, source, CONFIG_VERSION)


@dataclass
class PriorOutput:
    loss: torch.Tensor  # mean cross-entropy over the scored tokens (all in ar mode, the masked ones in mask mode)
    accuracy: torch.Tensor  # share of scored tokens whose argmax prediction is right
    num_targets: int  # how many tokens were scored


# ------------------------------------------------------------------------------------------------------- the blocks
def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)


class Rotary(nn.Module):
    """Rotary position embedding: rotates pairs of query/key channels by position-dependent angles."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        # Not saved with the weights: they follow from the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def at(self, positions: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, H, T, head_dim]: channel j of the first half pairs with channel j of the second half."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class KVCache:
    """Keys and values of one attention layer for the positions processed so far, in buffers of ``max_len``
    positions allocated on the first call (in the dtype of the keys, which autocast may have lowered)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.keys = self.values = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [B, H, T, hd]; return those of all positions so far."""
        if self.keys is None:
            batch, heads, _, head_dim = k.shape
            self.keys = k.new_empty(batch, heads, self.max_len, head_dim)
            self.values = v.new_empty(batch, heads, self.max_len, head_dim)
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def drop_last(self, count: int) -> None:
        """Forget the last ``count`` positions (their buffer space is reused by the next ``append``)."""
        self.length -= count


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, causal: bool, rope=None, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, keep_last: int | None = None) -> torch.Tensor:
        """``attn_mask``: bool [t, S] (True: may attend) for the t new queries over all S keys, cached ones first;
        given, it replaces ``causal``. ``keep_last``: every position gives keys and values, but only the last
        ``keep_last`` attend (the output has that many positions)."""
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:
            k, v = cache.append(k, v)
        mask = attn_mask
        if keep_last is not None:
            q, t = q[:, :, t - keep_last:], keep_last
            mask = None if mask is None else mask[-keep_last:]
        if mask is None and causal and t > 1:
            # The new queries are the last t of the k.shape[2] positions: query i sees keys up to its own position.
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: float, kind: str, dropout: float):
        super().__init__()
        self.swiglu = kind == "swiglu"
        # SwiGLU has three matrices instead of two; 2/3 of the width keeps the parameter count comparable.
        hidden = int(mlp_ratio * d_model * (2 / 3 if self.swiglu else 1))
        self.fc = nn.Linear(d_model, 2 * hidden if self.swiglu else hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.drop(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, c: TokenPriorConfig):
        super().__init__()
        self.norm1 = make_norm(c.norm, c.d_model)
        self.attn = SelfAttention(c.d_model, c.n_heads, c.dropout)
        self.norm2 = make_norm(c.norm, c.d_model)
        self.mlp = MLP(c.d_model, c.mlp_ratio, c.mlp, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, causal: bool, rope=None, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, keep_last: int | None = None) -> torch.Tensor:
        """``keep_last``: only the last ``keep_last`` positions' outputs are computed (the others still give the
        attention their keys and values)."""
        attended = self.attn(self.norm1(x), causal, rope, cache, attn_mask, keep_last)
        if keep_last is not None:
            x = x[:, x.shape[1] - keep_last:]
        x = x + self.drop(attended)
        return x + self.mlp(self.norm2(x))


class GroupMixture(nn.Module):
    """A mixture-of-products output for the tokens that one parallel step draws together:
    p(x_S | context) = sum_z pi(z | context) prod_{i in S} p(x_i | z, context).

    ``pi`` is a linear gate on the mean hidden state of the group's queries (they all see the same context). A
    component z shifts each query's hidden state by a small MLP of it and of z's embedding, position by position,
    before the shared output head, so a component can mean "thick strokes here, an open loop there" for the group
    at once. Components are told apart only by their random initial embeddings; the marginal likelihood trains
    them."""

    def __init__(self, d_model: int, components: int):
        super().__init__()
        self.gate = nn.Linear(d_model, components)
        self.embedding = nn.Parameter(torch.zeros(components, d_model))
        self.fc = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def gate_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mean query hidden state of a group [..., d] -> component logits [..., Z]."""
        return self.gate(pooled)

    def modulate(self, hidden: torch.Tensor, component: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, n, d] -> [B, n, Z, d] under every component (``component`` None), or [B, n, d] under
        the component of each row (``component``: int64 [B])."""
        base = self.fc(hidden)
        if component is None:
            return hidden[:, :, None] + self.proj(F.gelu(base[:, :, None] + self.embedding))
        return hidden + self.proj(F.gelu(base + self.embedding[component][:, None]))


# ------------------------------------------------------------------------------------------------------- sampling
def uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) drawn from ``generator`` (on its own device) or, without one, from torch's global generator."""
    return torch.rand(shape, generator=generator, device=generator.device if generator else device).to(device)


def sample_from_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                       generator: torch.Generator | None,
                       min_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits [N, K]; returns (tokens [N], their log-probability under the filtered
    distribution that was sampled). ``min_p`` drops the tokens less likely than ``min_p`` times the most likely one
    (Nguyen et al., 2024), after top-k and top-p: a cut that follows the row's confidence, where top-k keeps the
    same number of tokens for a peaked row as for a flat one."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones already reach top_p (the most likely token always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if min_p is not None and min_p > 0:
        # in log space: p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
        best = logits.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < best + math.log(min_p), float("-inf"))
    log_probs = logits.log_softmax(-1)
    tokens = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(1)


def guide_logits(strong: torch.Tensor, weak: torch.Tensor, scale: float) -> torch.Tensor:
    """weak + scale * (strong - weak): classifier-free guidance (weak: the unconditional logits) and autoguidance
    (weak: a weaker prior's logits) alike."""
    return weak + scale * (strong - weak)


def combine_guidance(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch stacked as [conditional; unconditional]."""
    return guide_logits(*logits.chunk(2), scale)


GUIDANCE_SCHEDULES = ("constant", "linear", "linear_tokens")
MASK_ORDERS = ("confidence", "halton")


def radical_inverse(i: int, base: int) -> float:
    """The i-th term of the van der Corput sequence in ``base`` (digits of i mirrored about the radix point)."""
    inverse, scale = 0.0, 1.0 / base
    while i > 0:
        i, digit = divmod(i, base)
        inverse += digit * scale
        scale /= base
    return inverse


def halton_order(height: int, width: int) -> torch.Tensor:
    """Raster positions of a height x width grid in the order the 2-D Halton sequence (bases 2 and 3) first visits
    their cells: every prefix of it is spread evenly over the grid, so the tokens decoded in one parallel step sit
    far apart (Besnier et al., "Halton scheduler for masked generative image transformer", ICLR 2025)."""
    return torch.tensor(_halton_cells(height, width), dtype=torch.long)


@functools.lru_cache(maxsize=16)
def _halton_cells(height: int, width: int) -> tuple[int, ...]:
    # cached: a prior trained on Halton masks asks for its order at every training step
    order, seen, i = [], set(), 0
    while len(order) < height * width:
        i += 1
        cell = int(radical_inverse(i, 3) * height) * width + int(radical_inverse(i, 2) * width)
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
    return tuple(order)


def check_sampling_options(*, temperature: float, top_k: int | None, top_p: float | None, steps: int,
                           guidance_schedule: str, order: str, revisit: bool, min_p: float | None = None,
                           **_) -> None:
    """Raise ValueError for sampling settings ``TokenPrior.sample`` cannot use. Shared with the saved
    ``SamplingConfig``, so that a bad setting is refused before a prior trains, not when it first samples."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy decoding), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if min_p is not None and not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1) or None, got {min_p}")
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
    if order not in MASK_ORDERS:
        raise ValueError(f"order must be one of {MASK_ORDERS}, got {order!r}")
    if order == "halton" and revisit:
        raise ValueError("revisit re-ranks decoded tokens by confidence; it does not combine with order='halton'")


def scheduled_guidance(scale: float, schedule: str, steps_done: float, tokens_done: float) -> float:
    """The guidance scale for a decoding step after which a share ``steps_done`` in (0, 1] of the steps and a share
    ``tokens_done`` of the tokens are decoded. "linear" ramps it from 1 (no guidance) up to ``scale`` at the end by
    steps, so the first tokens, which fix the layout, are drawn with the model's own diversity and the later ones are
    pushed towards the class (MUSE's and VAR's linear schedule); "linear_tokens" ramps it by tokens instead. The two
    agree for an AR prior (a step is a token); a masked prior whose schedule decodes few tokens in its first steps and
    many in its last (cubic: 1, 1, 1, 4, 5, 9, 12, 16 of 49) guides its middle steps far less by tokens, so that
    each token gets the scale an AR prior gives the token at the same share of the grid."""
    if schedule == "constant":
        return scale
    return 1.0 + (scale - 1.0) * (steps_done if schedule == "linear" else tokens_done)


def mask_ratio(r, schedule: str = "cosine"):
    """gamma(r): the share of tokens still masked after a share ``r`` in [0, 1] of the decoding steps (a float or a
    tensor), by one of ``MASK_SCHEDULES``; gamma(0) = 1, gamma(1) = 0, decreasing."""
    if schedule == "cosine":
        return torch.cos(math.pi / 2 * r) if torch.is_tensor(r) else math.cos(math.pi / 2 * r)
    power = {"linear": 1, "square": 2, "cubic": 3, "quartic": 4}.get(schedule)
    if power is None:
        raise ValueError(f"mask schedule must be one of {MASK_SCHEDULES}, got {schedule!r}")
    return 1 - r ** power


def masked_counts(length: int, steps: int, schedule: str = "cosine") -> list[int]:
    """How many of ``length`` tokens are still masked when each step of ``steps``-step masked decoding begins:
    ``length`` at first, then floor(length * gamma(t/steps)) by ``mask_ratio``'s schedule (cosine: MaskGIT's), at
    least one fewer each step (so decoding always finishes within ``steps``); steps that would begin with none
    masked are left out."""
    counts = [length]
    for t in range(1, steps):
        left = min(math.floor(length * mask_ratio(t / steps, schedule)), counts[-1] - 1)
        if left <= 0:
            break
        counts.append(left)
    return counts


# ---------------------------------------------------------------------------------------------------------- model
class TokenPrior(PretrainedMixin, nn.Module):
    def __init__(self, config: TokenPriorConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = TokenPriorConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = c = config
        # checked here, not in the config: training fills num_classes in from the data after reading the config
        if c.class_at_every_token and not c.num_classes:
            raise ValueError("invalid TokenPriorConfig: class_at_every_token needs class conditioning (num_classes)")
        if c.text_at_every_token and not c.text_vocab:
            raise ValueError("invalid TokenPriorConfig: text_at_every_token needs caption conditioning (text_vocab)")
        K = c.codebook_size
        # Row K of the image-token table is the [MASK] token in mask mode and the start token in ar mode.
        self.token_emb = nn.Embedding(K + 1, c.d_model)
        self.mask_id = K if c.mode == "mask" else None
        # Row num_classes is the null class: "no class", the unconditional half of guidance.
        self.class_emb = nn.Embedding(c.num_classes + 1, c.d_model) if c.num_classes else None
        self.text_tokenizer = make_text_tokenizer(c.text_vocab, c.text_words) if c.text_vocab else None
        self.text_emb = nn.Embedding(self.text_tokenizer.vocab_size, c.d_model) if c.text_vocab else None
        max_len = c.prefix_len + c.seq_len
        self.pos_emb = nn.Parameter(torch.zeros(max_len, c.d_model)) if c.positions == "learned" else None
        self.rotary = Rotary(c.d_model // c.n_heads, max_len) if c.positions == "rope" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = make_norm(c.norm, c.d_model)
        self.head = None if c.tie_weights else nn.Linear(c.d_model, K, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(K))
        self.mixture = GroupMixture(c.d_model, c.group_mixture) if c.group_mixture else None
        self.apply(self._init_weights)
        if self.mixture is not None:  # distinct embeddings are what tell the components apart at first
            nn.init.normal_(self.mixture.embedding, std=1.0)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)
        for block in self.blocks:  # GPT-2: shrink the residual branches so that the residual stream stays O(1)
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * c.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.head_bias.device

    @property
    def causal(self) -> bool:
        return self.config.mode == "ar"

    # ------------------------------------------------------------------------------------------- inputs and checks
    def _check_tokens(self, indices: torch.Tensor, allow_mask: bool = False) -> torch.Tensor:
        """Token grids [B, h, w] or [B, h*w] -> int64 [B, L] on the model's device, validated."""
        c = self.config
        if not torch.is_tensor(indices) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"expected an integer tensor of token ids, got "
                             f"{indices.dtype if torch.is_tensor(indices) else type(indices).__name__}")
        h, w = c.token_grid
        if not ((indices.dim() == 3 and tuple(indices.shape[1:]) == (h, w)) or
                (indices.dim() == 2 and indices.shape[1] == h * w)):
            raise ValueError(f"expected token grids [B, {h}, {w}] or [B, {h * w}] (this prior's grid), "
                             f"got shape {tuple(indices.shape)}")
        tokens = indices.reshape(len(indices), h * w).to(self.device, torch.long)
        top = c.codebook_size + (allow_mask and self.mask_id is not None)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= top):
            raise ValueError(f"token ids must be in [0, {top}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    def _encode_condition(self, condition, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validate ``condition`` -> (class ids [B] or None, caption token ids [B, max_text_len] or None).

        ``condition``: None; class labels (an int, a list or tensor of B ints); captions (a str, a list of B str);
        or a dict with keys "labels" and/or "captions". A single int or str applies to the whole batch. Parts left
        out are the null class / the empty caption (unconditional).
        """
        labels, captions = self._split_condition(condition)
        c = self.config
        if labels is not None and self.class_emb is None:
            raise ValueError("class labels given to a prior without class conditioning (num_classes is not set); "
                             + self._conditioning_hint())
        if captions is not None and self.text_emb is None:
            raise ValueError("captions given to a prior without text conditioning (text_vocab is not set); "
                             + self._conditioning_hint())
        class_ids = self._class_ids(labels, batch) if self.class_emb is not None else None
        text_ids = None
        if self.text_emb is not None:
            if captions is None:
                captions = [""] * batch
            elif isinstance(captions, str):
                captions = [captions] * batch
            if len(captions) != batch:
                raise ValueError(f"got {len(captions)} captions for a batch of {batch}")
            text_ids = self.text_tokenizer.encode_batch(list(captions), c.max_text_len).to(self.device)
        return class_ids, text_ids

    def _conditioning_hint(self) -> str:
        """What this prior can be conditioned on, in the words of the command line."""
        if self.class_emb is not None:
            return f"this prior is class-conditional: give a class in [0, {self.config.num_classes}) (--class N)"
        if self.text_emb is not None:
            return 'this prior is text-conditional: give a caption (--text "...")'
        return "this prior is unconditional: give neither --class nor --text"

    @staticmethod
    def _split_condition(condition):
        if condition is None:
            return None, None
        if isinstance(condition, dict):
            unknown = sorted(set(condition) - {"labels", "captions"})
            if unknown:
                raise ValueError(f"unknown condition keys {unknown}; use 'labels' and/or 'captions'")
            return condition.get("labels"), condition.get("captions")
        is_captions = isinstance(condition, str) or (
            isinstance(condition, (list, tuple)) and len(condition) > 0 and all(isinstance(s, str) for s in condition))
        return (None, condition) if is_captions else (condition, None)

    def _class_ids(self, labels, batch: int) -> torch.Tensor:
        n = self.config.num_classes
        if labels is None:
            return torch.full((batch,), n, dtype=torch.long, device=self.device)
        try:
            ids = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"class labels must be ints, got {labels!r}") from None
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() > 1:
            raise ValueError(f"class labels must be an int or a 1-D sequence of ints, got {labels!r}")
        ids = ids.expand(batch) if ids.dim() == 0 else ids
        if len(ids) != batch:
            raise ValueError(f"got {len(ids)} class labels for a batch of {batch}")
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"class labels must be in [0, {n}), got values in [{int(ids.min())}, {int(ids.max())}]")
        return ids.to(self.device, torch.long)

    def _drop_condition(self, class_ids, text_ids, generator):
        """Training: replace the condition by the null one with probability cond_dropout (jointly for both)."""
        batch = len(class_ids if class_ids is not None else text_ids)
        drop = uniform((batch,), generator, self.device) < self.config.cond_dropout
        null_class, null_text = self._encode_condition(None, batch)
        if class_ids is not None:
            class_ids = torch.where(drop, null_class, class_ids)
        if text_ids is not None:
            text_ids = torch.where(drop[:, None], null_text, text_ids)
        return class_ids, text_ids

    def _with_null(self, class_ids, text_ids):
        """The condition stacked as [given; null], the batch layout of classifier-free guidance."""
        batch = len(class_ids if class_ids is not None else text_ids)
        null_class, null_text = self._encode_condition(None, batch)
        return (None if class_ids is None else torch.cat([class_ids, null_class]),
                None if text_ids is None else torch.cat([text_ids, null_text]))

    # ------------------------------------------------------------------------------------------------ the network
    def _prefix(self, class_ids, text_ids, batch: int) -> torch.Tensor:
        """Embeddings [B, prefix_len, d] of [class token][caption tokens][start token (ar)]."""
        parts = []
        if class_ids is not None:
            parts.append(self.class_emb(class_ids)[:, None])
        if text_ids is not None:
            parts.append(self.text_emb(text_ids))
        if self.config.mode == "ar":
            start = torch.full((batch, 1), self.config.codebook_size, dtype=torch.long, device=self.device)
            parts.append(self.token_emb(start))
        return torch.cat(parts, dim=1) if parts else self.token_emb.weight.new_zeros(batch, 0, self.config.d_model)

    def _condition_offset(self, class_ids, text_ids) -> torch.Tensor | None:
        """[B, 1, d] added to every image token's input: the class embedding (class_at_every_token) and/or the caption
        summary (text_at_every_token); None when neither is set. Computed once per batch, not per decoded token."""
        c, offset = self.config, None
        if c.class_at_every_token:  # class_ids is never None then: no label means the null class
            offset = self.class_emb(class_ids)[:, None]
        if c.text_at_every_token:  # text_ids likewise: no caption means the empty one
            summary = self._caption_summary(text_ids)[:, None]
            offset = summary if offset is None else offset + summary
        return offset

    def _embed_tokens(self, tokens: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings [B, T, d] of image tokens [B, T], plus the ``_condition_offset`` if there is one."""
        x = self.token_emb(tokens)
        return x if offset is None else x + offset

    def _caption_summary(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B, d]: the mean embedding of each caption's non-PAD tokens (BOS and EOS are always there)."""
        keep = (text_ids != self.text_tokenizer.PAD).unsqueeze(-1)
        emb = self.text_emb(text_ids)
        return (emb * keep).sum(1) / keep.sum(1)

    def _transformer(self, x: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None,
                     positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                     keep_last: int | None = None) -> torch.Tensor:
        """Embeddings [B, T, d] at positions start..start+T-1 (or at ``positions`` [T]) -> final hidden states
        [B, T, d]. ``attn_mask`` (bool [T, S]) replaces the mode's own attention pattern. ``keep_last``: only the
        last ``keep_last`` positions' hidden states are wanted, so the last block computes no others (those positions
        only fill the caches)."""
        rope = None
        if positions is None:
            positions = slice(start, start + x.shape[1])
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        else:
            rope = self.rotary.at(positions)
        x = self.drop(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, self.causal, rope, caches[i] if caches is not None else None, attn_mask,
                      keep_last if i == last else None)
        return self.norm(x)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.token_emb.weight[: self.config.codebook_size] if self.head is None else self.head.weight
        return F.linear(hidden, weight, self.head_bias)

    def _image_logits(self, tokens: torch.Tensor, class_ids, text_ids) -> torch.Tensor:
        """Logits [B, L, K] for every image position.

        ar: teacher-forced next-token logits (position i sees tokens < i). mask: logits given the visible tokens of
        ``tokens`` (which may hold [MASK]); with ``mask_attention`` "group_causal", teacher-forced like ar: the
        logits of position i given the tokens of the Halton groups before i's.
        """
        if self.config.group_causal:
            return self._group_causal_logits(tokens, class_ids, text_ids)
        prefix = self._prefix(class_ids, text_ids, len(tokens))
        p = prefix.shape[1]
        offset = self._condition_offset(class_ids, text_ids)
        if self.config.mode == "ar":
            hidden = self._transformer(torch.cat([prefix, self._embed_tokens(tokens[:, :-1], offset)], dim=1))
            return self._head(hidden[:, p - 1:])
        hidden = self._transformer(torch.cat([prefix, self._embed_tokens(tokens, offset)], dim=1))
        return self._head(hidden[:, p:])

    def _halton_groups(self) -> list[torch.Tensor]:
        """The positions decoded by each step of ``train_mask_steps``-step Halton-order decoding, int64 tensors."""
        L = self.config.seq_len
        order = halton_order(*self.config.token_grid).to(self.device)
        counts = masked_counts(L, self.config.train_mask_steps, self.config.mask_schedule) + [0]
        return [order[L - now:L - after] for now, after in zip(counts, counts[1:])]

    def _group_causal_mask(self, prefix_len: int) -> torch.Tensor:
        """bool [T, T], T = prefix_len + 2L, for the sequence [prefix, tokens, queries] (True: may attend). The
        prefix sees itself only; a token sees the prefix and the tokens of its own and earlier groups; a query sees
        the prefix, the tokens of earlier groups and itself. So each query gets exactly the context its position
        has when Halton-order decoding draws it, and the tokens' keys equal those that sampling caches."""
        L, P = self.config.seq_len, prefix_len
        group = self._group_index()
        allowed = torch.zeros(P + 2 * L, P + 2 * L, dtype=torch.bool, device=self.device)
        allowed[:, :P] = True
        allowed[P:P + L, P:P + L] = group[None, :] <= group[:, None]
        allowed[P + L:, P:P + L] = group[None, :] < group[:, None]
        allowed[P + L:, P + L:] = torch.eye(L, dtype=torch.bool, device=self.device)
        return allowed

    def _group_index(self) -> torch.Tensor:
        """int64 [L]: the Halton group (decoding step) of each position, computed once per device (every training
        step of a group-causal prior needs it, a mixture's several times)."""
        cache = self.__dict__.setdefault("_group_indices", {})  # not a buffer: derived from the config, never saved
        if self.device not in cache:
            group = torch.empty(self.config.seq_len, dtype=torch.long, device=self.device)
            for g, positions in enumerate(self._halton_groups()):
                group[positions] = g
            cache[self.device] = group
        return cache[self.device]

    def _group_members(self) -> torch.Tensor:
        """float [L, G]: one-hot membership of each position in its Halton group, computed once per device like
        ``_group_index`` (a mixture's training step needs it twice; building it reads the group count back from the
        device, which would stall a GPU every step)."""
        cache = self.__dict__.setdefault("_group_members_cache", {})  # derived from the config, never saved
        if self.device not in cache:
            group = self._group_index()
            cache[self.device] = F.one_hot(group, len(self._halton_groups())).float()
        return cache[self.device]

    def _group_causal_logits(self, tokens: torch.Tensor, class_ids, text_ids) -> torch.Tensor:
        """Teacher-forced logits [B, L, K] of a group-causal prior (with ``group_mixture``: the log of each token's
        marginal probability, the component summed out); see ``_group_causal_hidden``."""
        hidden = self._group_causal_hidden(tokens, class_ids, text_ids)
        if self.mixture is None:
            return self._head(hidden)
        return self._mixture_marginal(*self._mixture_terms(hidden))

    def _mixture_terms(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query hidden states [B, L, d] of a ``group_mixture`` prior -> (log pi [B, G, Z] per Halton group, the
        tokens' log-probabilities under every component [B, L, Z, K])."""
        member = self._group_members().to(hidden.dtype)
        pooled = torch.einsum("bld,lg->bgd", hidden, member) / member.sum(0)[:, None]
        log_gate = self.mixture.gate_logits(pooled).float().log_softmax(-1)
        return log_gate, self._head(self.mixture.modulate(hidden)).float().log_softmax(-1)

    @staticmethod
    def _component_scores(log_probs: torch.Tensor, tokens: torch.Tensor, label_smoothing: float = 0.0):
        """Each token's log-likelihood under every component [B, L, Z], from ``_mixture_terms``' log-probabilities.
        With ``label_smoothing`` e, the smoothed score (1 - e) log p(x_i) + e mean_k log p(k): what cross-entropy
        with smoothing maximises when there is one component."""
        Z = log_probs.shape[2]
        scores = log_probs.gather(-1, tokens[:, :, None, None].expand(-1, -1, Z, 1)).squeeze(-1)
        if label_smoothing:
            scores = (1 - label_smoothing) * scores + label_smoothing * log_probs.mean(-1)
        return scores

    def _mixture_marginal(self, log_gate: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
        """log sum_z pi(z) p(k | z) [B, L, K]: each token's own distribution, the group's component summed out."""
        return torch.logsumexp(log_gate[:, self._group_index(), :, None] + log_probs, dim=2)

    def _group_causal_hidden(self, tokens: torch.Tensor, class_ids, text_ids) -> torch.Tensor:
        """Teacher-forced final hidden states [B, L, d] of a group-causal prior's queries: one pass over [prefix,
        tokens, queries]; a query is the [MASK] embedding at its position."""
        L = self.config.seq_len
        prefix = self._prefix(class_ids, text_ids, len(tokens))
        P = prefix.shape[1]
        offset = self._condition_offset(class_ids, text_ids)
        queries = self._embed_tokens(torch.full_like(tokens, self.mask_id), offset)
        x = torch.cat([prefix, self._embed_tokens(tokens, offset), queries], dim=1)
        image = torch.arange(P, P + L, device=self.device)
        positions = torch.cat([torch.arange(P, device=self.device), image, image])
        hidden = self._transformer(x, positions=positions, attn_mask=self._group_causal_mask(P))
        return hidden[:, P + L:]

    def _guided_logits(self, tokens, class_ids, text_ids, guidance_scale: float | None) -> torch.Tensor:
        if guidance_scale is None:
            return self._image_logits(tokens, class_ids, text_ids)
        both = self._image_logits(tokens.repeat(2, 1), *self._with_null(class_ids, text_ids))
        return combine_guidance(both, guidance_scale)

    def _check_guidance(self, guidance_scale: float | None) -> None:
        if guidance_scale is not None and self.class_emb is None and self.text_emb is None:
            raise ValueError("classifier-free guidance needs a prior with class or text conditioning")

    def _check_guide(self, guide: "TokenPrior") -> None:
        """A guide must decode the same way over the same tokens and read the same conditions."""
        if not isinstance(guide, TokenPrior):
            raise TypeError(f"the guide must be a TokenPrior, got {type(guide).__name__}")
        mine, theirs = self.config, guide.config
        same = ("mode", "token_grid", "codebook_size", "mask_attention", "train_masks", "train_mask_steps",
                "mask_schedule", "num_classes", "text_vocab", "max_text_len")
        differ = [f"{key} {getattr(theirs, key)!r} (this prior: {getattr(mine, key)!r})" for key in same
                  if getattr(mine, key) != getattr(theirs, key)]
        if differ:
            raise ValueError("the guide must be a prior of the same kind as the one it guides; it has "
                             + ", ".join(differ))

    # ------------------------------------------------------------------------------------------------ public API
    def logits(self, indices: torch.Tensor, condition=None, *, guidance_scale: float | None = None) -> torch.Tensor:
        """Logits [B, h*w, K] over the image tokens in raster order (see ``_image_logits``).

        With ``guidance_scale`` s, classifier-free guidance: uncond + s * (cond - uncond), both halves computed in
        one batch. In mask mode ``indices`` may hold ``mask_id``.
        """
        self._check_guidance(guidance_scale)
        tokens = self._check_tokens(indices, allow_mask=True)
        return self._guided_logits(tokens, *self._encode_condition(condition, len(tokens)), guidance_scale)

    def _halton_rank(self) -> torch.Tensor:
        """int64 [L]: rank[p] = when position p comes in ``halton_order`` (lower ranks are decoded first)."""
        order = halton_order(*self.config.token_grid).to(self.device)
        return torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=self.device))

    def draw_mask(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mask-mode training mask, bool [B, L]. ``train_masks`` "random": per grid, a share gamma(u) (``mask_ratio``),
        u ~ U(0, 1), of the positions (at least one), chosen uniformly at random. "halton": per grid, the mask that
        one step of ``train_mask_steps``-step Halton-order decoding begins with, the step drawn uniformly."""
        L = self.config.seq_len
        if self.config.train_masks == "halton":
            counts = torch.tensor(masked_counts(L, self.config.train_mask_steps, self.config.mask_schedule),
                                  device=self.device)
            step = (uniform((batch,), generator, self.device) * len(counts)).long().clamp_(max=len(counts) - 1)
            return self._halton_rank()[None, :] >= (L - counts[step])[:, None]
        ratio = mask_ratio(uniform((batch,), generator, self.device), self.config.mask_schedule)
        num_masked = (ratio * L).ceil().clamp(1, L)
        rank = uniform((batch, L), generator, self.device).argsort(dim=1).argsort(dim=1)
        return rank < num_masked[:, None]

    def forward(self, indices: torch.Tensor, condition=None, *,
                generator: torch.Generator | None = None) -> PriorOutput:
        """Training objective. ar: next-token cross-entropy on every image token. mask: cross-entropy on a random
        share of masked tokens (``draw_mask``, by the ``mask_schedule``), the others visible; with
        ``mask_attention`` "group_causal", on every token given the groups before its own
        (``_group_causal_logits``). In training mode the condition is dropped to the null one with probability
        ``cond_dropout``. Randomness comes from ``generator`` if given (condition dropout first, then the mask,
        then the input noise)."""
        tokens = self._check_tokens(indices)
        class_ids, text_ids = self._encode_condition(condition, len(tokens))
        if self.training and self.config.cond_dropout > 0 and (class_ids is not None or text_ids is not None):
            class_ids, text_ids = self._drop_condition(class_ids, text_ids, generator)
        # a group-causal prior is teacher-forced like an AR prior: every token is scored, given its earlier groups
        ar = self.config.mode == "ar" or self.config.group_causal
        masked = None if ar else self.draw_mask(len(tokens), generator)
        scored = torch.ones_like(tokens, dtype=torch.bool) if ar else masked
        inputs = tokens
        if self.training and self.config.input_noise > 0:
            inputs, replaced = self._noisy_inputs(tokens, generator)
            if not ar:  # the replaced visible tokens are scored too (as in BERT), so that the model learns to spot
                scored = masked | replaced  # a wrong visible token and what it should be (``revisit`` decoding)
        if self.mixture is not None:  # every token is scored, by the group likelihoods with the component summed out
            log_gate, log_probs = self._mixture_terms(self._group_causal_hidden(inputs, class_ids, text_ids))
            scores = self._component_scores(log_probs, tokens, self.config.label_smoothing)
            group_scores = log_gate + torch.einsum("blz,lg->bgz", scores, self._group_members())
            loss = -torch.logsumexp(group_scores, -1).sum() / tokens.numel()
            with torch.no_grad():
                accuracy = (self._mixture_marginal(log_gate, log_probs).argmax(-1) == tokens).float().mean()
            return PriorOutput(loss, accuracy, int(tokens.numel()))
        logits = self._image_logits(inputs if ar else inputs.masked_fill(masked, self.mask_id), class_ids, text_ids)
        logits, targets = logits[scored], tokens[scored]
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return PriorOutput(loss, accuracy.detach(), int(targets.numel()))

    def _teacher_forced_log_probs(self, tokens: torch.Tensor, class_ids, text_ids) -> torch.Tensor:
        """log p(x_i | what precedes i) [B, L] in one teacher-forced pass (ar or group-causal), with gradients."""
        log_probs = self._image_logits(tokens, class_ids, text_ids).float().log_softmax(-1)
        return log_probs.gather(-1, tokens[..., None]).squeeze(-1)

    def _sequence_log_prob(self, tokens: torch.Tensor, class_ids, text_ids,
                           weights: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | c) [B] of whole grids, with gradients (ar or group-causal: one teacher-forced pass); with
        ``weights`` [L], the weighted sum of the tokens' log-probabilities."""
        per_token = self._teacher_forced_log_probs(tokens, class_ids, text_ids)
        return per_token.sum(-1) if weights is None else per_token @ weights

    def _decoding_progress(self) -> torch.Tensor:
        """float [L]: the share of decoding steps done once each position is drawn (ar: (i + 1) / L; group-causal:
        (g + 1) / G for its Halton group g), the factor by which a "linear" guidance schedule scales its guidance."""
        if self.config.mode == "ar":
            return torch.arange(1, self.config.seq_len + 1, device=self.device) / self.config.seq_len
        return (self._group_index() + 1).float() / len(self._halton_groups())

    def alignment_loss(self, reference: "TokenPrior", indices: torch.Tensor, condition, *, weight: float,
                       beta: float, schedule: str = "constant",
                       generator: torch.Generator | None = None) -> PriorOutput:
        """Condition contrastive alignment (CCA; Chen et al. 2024, "Toward guidance-free AR visual generation"), a
        fine-tuning objective that teaches a conditional prior to sample as classifier-free guidance would, so that
        sampling needs no unconditional pass (half the rows of a guided batch). ``reference`` is the prior as
        trained (frozen, usually this prior's starting weights). Each grid x with its condition c is a positive:
        log p(x|c) / p_ref(x|c) is pushed up; x with another grid's condition c' (the batch's conditions shuffled) a
        negative, pushed down with ``weight`` (CCA's lambda) times the force. Rows whose condition is dropped
        (``cond_dropout``) stay positives on both sides, so that the unconditional model is kept, and so do
        negatives that drew their own class. "accuracy" in the output: how often a grid gained more under its own
        condition than under the mismatched one.

        At the optimum beta * log(p / p_ref)(x|c) = log(p(c|x) / (weight * p(c))): the reference tilted by
        p(c|x)^(1/beta), which is what guidance at scale 1 + 1/beta does. So beta = 1 aims at scale 2, and
        ``weight`` must stay well below 1 / p(c) (10 for ten balanced classes): above it, every real grid, its own
        class's included, is pushed down, and the probability goes to grids that look like no data at all
        (measured: weight 50 wrecked an MNIST prior in 50 steps). ``schedule`` "linear" weights each token's
        log-ratio by the share of decoding done once it is drawn (``_decoding_progress``), as the linear guidance
        schedule scales guidance: the first tokens, which fix the layout, keep more of the reference's diversity.
        Needs exact grid likelihoods: ar or group-causal, without ``group_mixture``."""
        c = self.config
        if not (c.mode == "ar" or c.group_causal) or self.mixture is not None:
            raise ValueError("alignment_loss needs an ar or group-causal prior without group_mixture (exact grid "
                             "likelihoods in one pass)")
        tokens = self._check_tokens(indices)
        class_ids, text_ids = self._encode_condition(condition, len(tokens))
        if class_ids is None and text_ids is None:
            raise ValueError("alignment_loss needs conditions (class labels or captions)")
        if schedule not in ("constant", "linear"):
            raise ValueError(f"alignment_loss: schedule must be constant or linear, got {schedule!r}")
        token_weights = self._decoding_progress() if schedule == "linear" else None
        null_class, null_text = self._encode_condition(None, len(tokens))
        dropped = uniform((len(tokens),), generator, self.device) < c.cond_dropout
        # the generator's own device (a CUDA generator cannot draw on the host), then the prior's
        order = torch.randperm(len(tokens), generator=generator,
                               device=generator.device if generator is not None else self.device).to(self.device)
        same = torch.ones(len(tokens), dtype=torch.bool, device=self.device)

        def arrange(ids, null):  # (the given condition, a mismatched one), both null where dropped
            if ids is None:
                return None, None
            keep = dropped if ids.dim() == 1 else dropped[:, None]
            given = torch.where(keep, null, ids)
            other = torch.where(keep, null, ids[order])
            same.logical_and_((given == other).reshape(len(tokens), -1).all(-1))
            return given, other

        class_pos, class_neg = arrange(class_ids, null_class)
        text_pos, text_neg = arrange(text_ids, null_text)
        both = torch.cat([tokens, tokens])
        class_both = None if class_pos is None else torch.cat([class_pos, class_neg])
        text_both = None if text_pos is None else torch.cat([text_pos, text_neg])
        log_p = self._sequence_log_prob(both, class_both, text_both, token_weights)
        with torch.no_grad():
            reference.train(self.training)  # the same dropout on both sides, so that the gaps start at zero
            log_ref = reference._sequence_log_prob(both, class_both, text_both, token_weights)
        gap_pos, gap_neg = (log_p - log_ref).chunk(2)
        negative = ~(dropped | same)  # a real mismatch: pushed down; otherwise kept like a positive
        sign = torch.where(negative, -1.0, 1.0)
        row_weights = torch.where(negative, weight, 1.0)
        loss = -(F.logsigmoid(beta * gap_pos) + row_weights * F.logsigmoid(sign * beta * gap_neg)).mean()
        loss = loss / max(weight, 1.0)  # keeps the step size of a large weight in check (as the paper's code does)
        with torch.no_grad():
            accuracy = (gap_pos > gap_neg)[negative].float().mean() if negative.any() else gap_pos.new_tensor(1.0)
        return PriorOutput(loss, accuracy, int(tokens.numel()))

    def _noisy_inputs(self, tokens: torch.Tensor, generator: torch.Generator | None):
        """(``tokens`` with a share ``input_noise`` of them, chosen at random, replaced by uniformly random codes,
        bool [B, L] of the positions chosen)."""
        K = self.config.codebook_size
        replace = uniform(tokens.shape, generator, self.device) < self.config.input_noise
        random_codes = (uniform(tokens.shape, generator, self.device) * K).long().clamp_(max=K - 1)
        return torch.where(replace, random_codes, tokens), replace

    @torch.no_grad()
    def log_prob(self, indices: torch.Tensor, condition=None, *, batch_size: int = 256) -> torch.Tensor:
        """Per-token log-probabilities [B, h, w] (computed in eval mode, without gradients).

        ar: exact chain rule, log p(x_i | x_<i, c); the sum over the grid is log p(x | c).
        mask, ``train_masks`` "random": a pseudo-log-likelihood, log p(x_i | x_-i, c) with only position i masked.
        It is not a normalised likelihood of the grid (its sum is not log p(x | c)); it costs L forward passes per
        grid, run as batches of ``batch_size`` singly-masked copies.
        mask, ``train_masks`` "halton": exact, like ar, for the distribution that Halton-order decoding in
        ``train_mask_steps`` steps samples (at temperature 1, no top-k/top-p or guidance): the tokens of each step's
        group are drawn independently given the groups before, so log p(x_i | earlier groups, c) sums to
        log p(x | c). One forward pass per step (group-causal attention: one in all). With ``group_mixture``, exact
        too: the chain rule runs on inside each group, in Halton order, so a token's probability is its mixture under
        the posterior over the group's component given the group's tokens before it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tokens = self._check_tokens(indices)
        class_ids, text_ids = self._encode_condition(condition, len(tokens))
        with self._eval_mode():
            if self.mixture is not None:
                per_token = self._mixture_chain_log_prob(tokens, class_ids, text_ids)
            elif self.config.mode == "ar" or self.config.group_causal:
                per_token = self._teacher_forced_log_probs(tokens, class_ids, text_ids)
            elif self.config.train_masks == "halton":
                per_token = self._group_chain_log_prob(tokens, class_ids, text_ids)
            else:
                per_token = self._pseudo_log_prob(tokens, class_ids, text_ids, batch_size)
        return per_token.reshape(len(tokens), *self.config.token_grid)

    def _mixture_chain_log_prob(self, tokens, class_ids, text_ids) -> torch.Tensor:
        log_gate, log_probs = self._mixture_terms(self._group_causal_hidden(tokens, class_ids, text_ids))
        scores = self._component_scores(log_probs, tokens)  # [B, L, Z]
        per_token = torch.empty(tokens.shape, device=self.device)
        for g, positions in enumerate(self._halton_groups()):
            group = scores[:, positions]  # [B, n, Z], in Halton order
            seen = group.cumsum(1) - group  # what the group's earlier tokens say about its component
            posterior = (log_gate[:, g, None] + seen).log_softmax(-1)
            per_token[:, positions] = torch.logsumexp(posterior + group, -1)
        return per_token

    def _group_chain_log_prob(self, tokens, class_ids, text_ids) -> torch.Tensor:
        per_token = torch.empty(tokens.shape, device=self.device)
        hidden = torch.ones(self.config.seq_len, dtype=torch.bool, device=self.device)  # masked when a step begins
        for group in self._halton_groups():
            logits = self._image_logits(tokens.masked_fill(hidden, self.mask_id), class_ids, text_ids)
            log_probs = logits[:, group].float().log_softmax(-1)
            per_token[:, group] = log_probs.gather(-1, tokens[:, group][..., None]).squeeze(-1)
            hidden[group] = False
        return per_token

    def _pseudo_log_prob(self, tokens, class_ids, text_ids, batch_size: int) -> torch.Tensor:
        B, L = tokens.shape
        per_token = torch.empty(B * L, device=self.device)
        # Row r of the virtual [B * L] batch is grid r // L with only position r % L masked.
        for rows in torch.arange(B * L, device=self.device).split(batch_size):
            grid, position = rows // L, rows % L
            masked = tokens[grid].clone()
            masked[torch.arange(len(rows)), position] = self.mask_id
            logits = self._image_logits(masked, None if class_ids is None else class_ids[grid],
                                        None if text_ids is None else text_ids[grid])
            log_probs = logits[torch.arange(len(rows)), position].float().log_softmax(-1)
            per_token[rows] = log_probs.gather(-1, tokens[grid, position][:, None]).squeeze(-1)
        return per_token.reshape(B, L)

    @torch.no_grad()
    def sample(self, n: int, condition=None, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, min_p: float | None = None, guidance_scale: float = 1.0,
               steps: int | None = None, remask_temperature: float = 4.5, revisit: bool = False,
               guidance_schedule: str = "constant", order: str | None = None, seed: int | None = None,
               batch_size: int = 64, grid: tuple[int, int] | None = None, return_logits: bool = False,
               guide: "TokenPrior | None" = None):
        """Sample ``n`` token grids, int64 [n, h, w] (in eval mode).

        ``condition``: as in ``forward``, one for all samples (an int or a str) or one per sample. ``guidance_scale``
        s != 1: classifier-free guidance, logits = uncond + s * (cond - uncond), conditional and unconditional halves
        run as one batch (s = 1 is the plain conditional model); ``guidance_schedule`` "linear" ramps the scale from
        1 at the first token (ar) or step (mask) up to s at the last, "linear_tokens" by the share of tokens decoded
        (the same for ar; see ``scheduled_guidance``). ``temperature``,
        ``top_k``, ``top_p``, ``min_p`` shape the distribution each token is drawn from (see ``sample_from_logits``).
        Mask mode decodes in ``steps`` parallel steps; which drawn tokens stay is decided by their log-probability
        plus Gumbel noise scaled by ``remask_temperature * (1 - step/steps)``; ``revisit`` lets tokens decoded
        earlier be re-masked too (see ``_sample_mask``). ``order`` "halton" decodes the positions in a fixed,
        spatially spread order instead of by confidence (see ``halton_order``). ``steps`` and ``order`` default to
        what the prior was trained for: ``train_mask_steps`` and "halton" for Halton masks, else 8 and "confidence";
        a group-causal prior can only be sampled that way.
        ``seed``: the same seed gives the same samples (for the same ``batch_size`` and device); None draws from
        torch's global generator. ``grid`` defaults to (and must equal) the prior's token grid. ``return_logits``:
        also return the (guided) logits [n, h, w, K] that each token was drawn from.
        ``guide``: a weaker prior of the same kind over the same tokenizer (fewer training steps, say) that guides this
        one in place of the unconditional model ("autoguidance", Karras et al., NeurIPS 2024): logits = guide + s *
        (prior - guide), both given the condition, with ``guidance_scale`` s and its schedule as above.
        """
        c = self.config
        if grid is not None and tuple(grid) != tuple(c.token_grid):
            raise ValueError(f"this prior generates {tuple(c.token_grid)} token grids, got grid={tuple(grid)}")
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
        halton_trained = c.mode == "mask" and c.train_masks == "halton"
        steps = (c.train_mask_steps if halton_trained else 8) if steps is None else steps
        order = ("halton" if halton_trained else "confidence") if order is None else order
        check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, steps=steps,
                               guidance_schedule=guidance_schedule, order=order, revisit=revisit)
        if c.group_causal and (order != "halton" or steps != c.train_mask_steps):
            raise ValueError(f"a group-causal prior decodes its {c.train_mask_steps} Halton groups in order and "
                             f"nothing else; got order={order!r}, steps={steps} (leave order and steps out)")
        if halton_trained and (order != "halton" or steps != c.train_mask_steps):
            warnings.warn(f"this prior was trained on the masks of {c.train_mask_steps}-step Halton-order decoding "
                          f"only; sampling it with order={order!r} and steps={steps} shows it other masks "
                          f"(use order='halton', steps={c.train_mask_steps})", stacklevel=2)
        guidance = None if guidance_scale == 1.0 else float(guidance_scale)
        if guide is not None:
            self._check_guide(guide)
            if c.group_mixture or guide.config.group_mixture:
                raise ValueError("autoguidance does not combine with group_mixture: the components of two priors do "
                                 "not correspond (use guidance_scale alone)")
        else:
            self._check_guidance(guidance)
        class_ids, text_ids = self._encode_condition(condition, n)
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        draw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
        scale_at = None if guidance is None else (
            lambda steps_done, tokens_done: scheduled_guidance(guidance, guidance_schedule, steps_done, tokens_done))
        samples, logits = [], []
        with self._eval_mode():
            for batch in torch.arange(n, device=self.device).split(batch_size):
                cond = (None if class_ids is None else class_ids[batch], None if text_ids is None else text_ids[batch])
                if c.mode == "ar" or c.group_causal:
                    tokens, used = self._sample_ordered(len(batch), *cond, scale_at, guide, draw, return_logits)
                else:
                    tokens, used = self._sample_mask(len(batch), *cond, scale_at, guide, steps, remask_temperature,
                                                     revisit, order, draw, return_logits)
                samples.append(tokens)
                logits.append(used)
        samples = torch.cat(samples).reshape(n, *c.token_grid)
        if return_logits:
            return samples, torch.cat(logits).reshape(n, *c.token_grid, c.codebook_size)
        return samples

    def _decode_groups(self) -> list[torch.Tensor | slice]:
        """The positions each pass of ordered decoding draws: one per pass in raster order (ar, as slices, which
        index without the cost of a gather), or the Halton groups (group-causal)."""
        if self.config.mode == "ar":
            return [slice(i, i + 1) for i in range(self.config.seq_len)]
        return self._halton_groups()

    def _sample_ordered(self, batch: int, class_ids, text_ids, guidance, guide: "TokenPrior | None", draw: dict,
                        keep_logits: bool):
        """Decoding in a fixed order with cached keys and values, one forward pass per group of ``_decode_groups``
        (ar: a token; group-causal: a Halton group). ``guidance``: None, or the guidance scale as a function of the
        share of decoding done. Without ``guide`` that is classifier-free guidance (conditional and unconditional
        halves in one batch); with it, autoguidance: the logits are guide + s * (prior - guide), both conditional.
        Returns (tokens, the logits each was drawn from if ``keep_logits``, else None)."""
        L, K = self.config.seq_len, self.config.codebook_size
        if guidance is not None and guide is None:
            decoders = [self._decoder(batch, *self._with_null(class_ids, text_ids), copies=2)]
        else:
            decoders = [self._decoder(batch, class_ids, text_ids)]
            if guidance is not None:
                decoders.append(guide._decoder(batch, class_ids, text_ids))
        groups = self._decode_groups()
        tokens = torch.empty(batch, L, dtype=torch.long, device=self.device)
        used = torch.empty(batch, L, K, device=self.device) if keep_logits else None
        previous, decoded = None, 0
        for step, group in enumerate(groups):
            hidden = [decoder.step(previous) for decoder in decoders]
            decoded += hidden[0].shape[1]
            scale = None if guidance is None else guidance((step + 1) / len(groups), decoded / L)
            if self.mixture is None:
                outputs = [decoder.prior._head(h).float() for decoder, h in zip(decoders, hidden)]
            else:
                outputs = [self._mixture_draw_logits(hidden[0], scale, draw["generator"])]
            logits = outputs[0]
            if scale is not None:
                if guide is None:
                    logits = combine_guidance(logits, scale)
                else:
                    logits = guide_logits(logits, outputs[1], scale)
            n = logits.shape[1]
            tokens[:, group] = sample_from_logits(logits.reshape(batch * n, K), **draw)[0].reshape(batch, n)
            if keep_logits:
                used[:, group] = logits
            previous = tokens[:, group]
        return tokens, used

    def _mixture_draw_logits(self, hidden: torch.Tensor, scale: float | None, generator) -> torch.Tensor:
        """One group of a ``group_mixture`` prior: draws each sample's component from the gate (guided like the
        tokens when ``scale`` is set; ``hidden`` then stacks [conditional; unconditional] rows) and returns the
        token logits [rows, n, K] given it, the same component in both halves."""
        gate = self.mixture.gate_logits(hidden.mean(1)).float()
        if scale is not None:
            gate = combine_guidance(gate, scale)
        component = sample_from_logits(gate, 1.0, None, None, generator)[0]
        component = component.repeat(len(hidden) // len(component))
        return self._head(self.mixture.modulate(hidden, component)).float()

    def _decoder(self, batch: int, class_ids, text_ids, copies: int = 1) -> "_ARDecoder | _GroupCausalDecoder":
        kind = _ARDecoder if self.config.mode == "ar" else _GroupCausalDecoder
        return kind(self, batch * copies, class_ids, text_ids, copies)

    def _group_causal_plan(self, prefix_len: int) -> list[tuple]:
        """What each pass of group-causal sampling feeds in, computed once per prefix length and device:
        (the Halton group whose queries it holds, the positions of its inputs, its attention mask). A pass takes the
        positions whose keys join the cache (the prefix in the first pass, then the group drawn last) and this
        group's queries; the cache-joining inputs see the cache and each other (one Halton group, or the prefix,
        which sees itself only, as in training); a query sees the cache, those inputs and itself."""
        key = (prefix_len, self.device)
        plans = self.__dict__.setdefault("_plans", {})  # not a buffer: derived from the config, never saved
        if key not in plans:
            L, P = self.config.seq_len, prefix_len
            groups = self._halton_groups()
            plan, cached = [], 0
            joining = torch.arange(P, device=self.device)  # positions whose keys join the cache in this pass
            for group in groups:
                m, n = len(joining), len(group)
                allowed = torch.ones(m + n, cached + m + n, dtype=torch.bool, device=self.device)
                allowed[:, cached + m:] = False
                allowed[m:, cached + m:] = torch.eye(n, dtype=torch.bool, device=self.device)
                plan.append((group, torch.cat([joining, P + group]), allowed))
                cached += m
                joining = P + group
            plans[key] = plan
        return plans[key]

    def _sample_mask(self, batch: int, class_ids, text_ids, guidance, guide: "TokenPrior | None", steps: int,
                     remask_temperature: float, revisit: bool, order: str, draw: dict, keep_logits: bool):
        """MaskGIT decoding: each step draws every masked token, keeps the most confident ones and re-masks the rest;
        the prior's ``mask_schedule`` sets how many stay masked after step t (none after the last). Kept tokens are
        never revisited, unless ``revisit``: then the tokens decoded in earlier steps are ranked with the new ones by
        their log-probability under this step's logits, so a token that no longer fits what was decoded around it can be
        re-masked and drawn again (for a prior trained with ``input_noise``, which learns to judge visible tokens).
        ``order`` "halton": the same schedule, but each step keeps the next positions of ``halton_order`` instead of the
        most confident ones (tokens decoded together then sit far apart rather than clustering)."""
        c = self.config
        L, K = c.seq_len, c.codebook_size
        if order == "halton":
            rank = self._halton_rank().float()
        tokens = torch.full((batch, L), self.mask_id, dtype=torch.long, device=self.device)
        used = torch.zeros(batch, L, c.codebook_size, device=self.device) if keep_logits else None
        # Every grid follows one schedule, so the count of masked tokens is known here without reading it off the
        # device (which would wait for a GPU every step, so that the next step's kernels could not be queued while
        # the current ones run). Fewer entries than steps when there are more steps than tokens.
        counts = masked_counts(L, steps, c.mask_schedule)
        for step in range(len(counts)):
            masked = tokens == self.mask_id
            progress = (step + 1) / steps
            stay_masked = counts[step + 1] if step + 1 < len(counts) else 0
            scale = None if guidance is None else guidance(progress, (L - stay_masked) / L)
            if guide is not None and scale is not None:
                logits = guide_logits(self._image_logits(tokens, class_ids, text_ids).float(),
                                      guide._image_logits(tokens, class_ids, text_ids).float(), scale)
            else:
                logits = self._guided_logits(tokens, class_ids, text_ids, scale).float()
            drawn, drawn_log_prob = sample_from_logits(logits.reshape(batch * L, -1), **draw)
            if order == "halton":
                confidence = -rank.expand(batch, L)
            else:
                log_prob = drawn_log_prob.reshape(batch, L)
                if revisit:  # decoded tokens compete with the new ones, judged by the model given everything else
                    current = (logits / draw["temperature"]).log_softmax(-1)
                    current = current.gather(-1, tokens.clamp(max=K - 1)[..., None]).squeeze(-1)
                    log_prob = torch.where(masked, log_prob, current)
                gumbel = -torch.log(-torch.log(uniform((batch, L), draw["generator"], self.device).clamp_(min=1e-20)))
                confidence = log_prob + remask_temperature * (1 - progress) * gumbel
            if not revisit:
                confidence = confidence.masked_fill(~masked, float("inf"))  # decoded tokens are never re-masked
            tokens = torch.where(masked, drawn.reshape(batch, L), tokens)
            if stay_masked > 0:
                tokens.scatter_(1, confidence.topk(stay_masked, dim=1, largest=False).indices, self.mask_id)
            if keep_logits:
                decoded_now = masked & (tokens != self.mask_id)
                used[decoded_now] = logits[decoded_now]
        return tokens, used


class _ARDecoder:
    """Raster-order decoding state of one AR prior for ``rows`` = ``copies`` * B conditions (B samples, stacked as
    [conditional; unconditional] for guidance): ``step(previous)`` feeds the token drawn last ([B, 1], None at first)
    and returns the final hidden states [rows, 1, d] of the next position."""

    def __init__(self, prior: TokenPrior, rows: int, class_ids, text_ids, copies: int):
        c = prior.config
        self.prior, self.copies, self.fed = prior, copies, 0
        self.prefix = prior._prefix(class_ids, text_ids, rows)
        self.offset = prior._condition_offset(class_ids, text_ids)
        self.caches = [KVCache(c.prefix_len + c.seq_len) for _ in prior.blocks]

    def step(self, previous: torch.Tensor | None) -> torch.Tensor:
        p = self.prior
        if previous is None:
            hidden = p._transformer(self.prefix, 0, self.caches, keep_last=1)[:, -1:]
        else:
            x = p._embed_tokens(previous.repeat(self.copies, 1), self.offset)
            hidden = p._transformer(x, p.config.prefix_len + self.fed, self.caches)[:, -1:]
            self.fed += 1
        return hidden


class _GroupCausalDecoder:
    """Halton-order decoding state of one group-causal prior, one forward pass per group over cached keys/values:
    ``step(previous)`` feeds the tokens of the group drawn last (None at first: the prefix is fed instead), whose keys
    join the cache, with the queries of this step's group, whose keys are dropped after it since no later position
    attends to a query (see ``TokenPrior._group_causal_plan``); it returns the final hidden states of the group's
    queries [rows, n, d]. Arguments as ``_ARDecoder``."""

    def __init__(self, prior: TokenPrior, rows: int, class_ids, text_ids, copies: int):
        self.prior, self.copies, self.done = prior, copies, 0
        self.joining = prior._prefix(class_ids, text_ids, rows)
        self.plan = prior._group_causal_plan(self.joining.shape[1])
        longest = max(len(group) for group, _, _ in self.plan)
        self.caches = [KVCache(self.joining.shape[1] + prior.config.seq_len + longest) for _ in prior.blocks]
        self.offset = prior._condition_offset(class_ids, text_ids)
        self.query = prior._embed_tokens(torch.full((rows, 1), prior.mask_id, device=prior.device), self.offset)

    def step(self, previous: torch.Tensor | None) -> torch.Tensor:
        p = self.prior
        group, positions, allowed = self.plan[self.done]
        n = len(group)
        if previous is not None:
            self.joining = p._embed_tokens(previous.repeat(self.copies, 1), self.offset)
        x = torch.cat([self.joining, self.query.expand(-1, n, -1)], dim=1)
        hidden = p._transformer(x, caches=self.caches, positions=positions, attn_mask=allowed, keep_last=n)
        for cache in self.caches:
            cache.drop_last(n)
        self.done += 1
        return hidden


TokenPrior.MODEL_TYPE = "vqkit.TokenPrior"
TokenPrior.CONFIG_CLASS = TokenPriorConfig
