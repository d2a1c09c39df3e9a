"""Training configuration: dataclasses, YAML presets and ``key=value`` overrides.

A run is described by one TrainConfig, saved as ``DIR/train_config.json``. Presets live in ``vqkit/configs/*.yaml``
and hold only the keys they change; everything else keeps the dataclass default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..models.prior import TokenPriorConfig, check_sampling_options
from ..models.tokenizer import VQModelConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

# The preset a newcomer gets when they name only the data.
DEFAULT_PRESETS = {"mnist5k": "mnist-vqvae", "digits": "digits-vqvae", "photos": "photos-vqvae", "shapes": "shapes-vqvae"}
FALLBACK_PRESET = "folder-vqvae"


class ConfigError(ValueError):
    """A config file, preset or override is wrong; the message says which and why."""


@dataclass
class DataConfig:
    source: str = "mnist5k"
    image_size: int | None = None  # folders/photos: crop or resize to this size; None = the source's own size
    channels: int | None = None  # None = the source's own
    resize: str = "resize"  # folders: resize | crop | stretch | pad
    strict: bool = False  # stop on the first unreadable file instead of skipping it with a warning
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables


@dataclass
class GANConfig:
    """The VQGAN terms. The discriminator's own training and the generator's adversarial term start independently
    (taming gates both with one factor, so D is still untrained when its term switches on)."""

    enabled: bool = False
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: str = "batch"  # batch | group | none | spectral
    loss: str = "hinge"  # hinge | non-saturating
    disc_start: int = 0  # step at which the discriminator starts training
    gen_start: int = 0  # step at which the adversarial term enters the generator's loss
    weight: float = 0.5  # multiplies the adaptive weight (VQGAN's disc_weight)
    adaptive_weight: bool = True  # lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer
    max_weight: float = 1e4  # clamp of the adaptive weight
    lr: float | None = None  # discriminator learning rate (default: optim.lr)
    lecam: float = 0.0  # LeCam regularisation weight (0: off)
    r1: float = 0.0  # R1 gradient penalty gamma (0: off)
    # DiffAugment policy for what D sees, real and reconstructed alike (and in the generator's term): "" (off) or a
    # comma-separated subset of "translation,cutout"; for small datasets, where D learns pixels, not looks
    augment: str = ""


@dataclass
class PerceptualConfig:
    kind: str = "none"  # none | lpips (VGG16 + learned heads; weights needed) | effnet (EfficientNet-Lite0 features)
    # | classifier (conv features of a classifier vqkit trains on the data's TRAIN split; labelled sources)
    weight: float = 1.0
    options: dict = field(default_factory=dict)  # e.g. vgg_weights / lpips_weights paths for lpips


@dataclass
class AugmentConfig:
    """Random changes to the tokenizer's training images (never to TEST), drawn per (seed, step): resume is exact."""

    hflip: bool = False  # mirror left-right with probability 1/2 (photos; not digits or text)
    channel_permute: bool = False  # RGB: one of the 6 orders of the colour channels, for hues the data lacks


@dataclass
class TrainConfig:
    model: VQModelConfig = field(default_factory=VQModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    steps: int = 3000
    batch_size: int = 64  # global batch; split evenly across ranks under torchrun
    loss: str = "l2"  # reconstruction loss: l1 | l2 | l1+l2
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 25
    image_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    eval_batch_size: int = 250
    preset: str | None = None  # recorded for the user's information

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SamplingConfig:
    """Default sampling settings saved with a prior (``vqkit sample`` options override them)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # drop tokens less likely than min_p times the most likely one
    guidance_scale: float = 1.0
    guidance_schedule: str = "constant"  # constant | linear (from 1 at the first token or step up to guidance_scale)
    steps: int = 8  # mask mode: parallel decoding steps
    revisit: bool = False  # mask mode: tokens decoded earlier may be re-masked (priors trained with input_noise)
    order: str = "confidence"  # mask mode: which drawn tokens each step keeps: confidence | halton (spread out)

    def __post_init__(self):
        check_sampling_options(**dataclasses.asdict(self))


@dataclass
class PriorTrainConfig:
    prior: TokenPriorConfig = field(default_factory=TokenPriorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, betas=[0.9, 0.95], weight_decay=0.01))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    conditioning: str = "auto"  # auto (class labels or captions when the data has them) | none | class | text
    # TRAIN's tokens also from every image shifted by whole pixels within this radius ((2r+1)^2 copies); 0: none
    shift_radius: int = 0
    # Exponential moving average of the prior's weights (0: off). The averaged weights are what is saved, evaluated
    # and sampled from; the optimizer keeps training the raw ones.
    ema_decay: float = 0.0
    # Sequence-level knowledge distillation: TRAIN's grids plus ``distill_samples`` grids sampled from the prior in
    # ``distill_from`` (a trained prior over the same tokenizer, sampled with its saved settings and TRAIN's labels or
    # captions in turn). A parallel (mask-mode) decoder draws many tokens at once as if independent; a teacher's
    # samples are less multi-modal than real data, the reason non-autoregressive translation models train on their
    # autoregressive teachers' outputs (Kim & Rush 2016, Gu et al. 2018).
    distill_from: str | None = None
    distill_samples: int = 0  # 0 with distill_from: ten times as many as TRAIN has
    # Start from the weights of a trained prior over the same tokenizer (same sizes; the mode may differ: a masked
    # prior can start from an autoregressive one, whose token and condition embeddings and attention layers carry
    # over, the causal mask being the only difference). Only for a fresh run; a resumed run reads its checkpoint.
    init_from: str | None = None
    # Condition contrastive alignment (``TokenPrior.alignment_loss``): fine-tune the prior in ``init_from``, which
    # stays frozen as the reference, so that it samples without classifier-free guidance (no unconditional half).
    # ``cca_weight`` is the paper's lambda (0: off, the usual objective; keep it well below the number of classes),
    # ``cca_beta`` its beta: the optimum is the reference guided at scale 1 + 1 / cca_beta.
    cca_weight: float = 0.0
    cca_beta: float = 1.0
    cca_schedule: str = "constant"  # or linear: each token's log-ratio weighted as linear guidance scales it
    steps: int = 3000
    batch_size: int = 64
    seed: int = 0
    precision: str = "auto"
    log_every: int = 25
    image_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    eval_batch_size: int = 250
    preset: str | None = None

    def __post_init__(self):
        if self.shift_radius < 0:
            raise ValueError(f"shift_radius must be >= 0 (whole pixels), got {self.shift_radius}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.distill_samples < 0:
            raise ValueError(f"distill_samples must be >= 0, got {self.distill_samples}")
        if self.prior.group_causal and (self.sampling.order != "halton"
                                        or self.sampling.steps != self.prior.train_mask_steps):
            # refused here, not at the first sample images, so that no training time is lost
            raise ValueError(f"prior.mask_attention=group_causal decodes in Halton order in exactly "
                             f"prior.train_mask_steps={self.prior.train_mask_steps} steps; set sampling.order=halton and "
                             f"sampling.steps={self.prior.train_mask_steps} (got {self.sampling.order!r}, "
                             f"{self.sampling.steps})")
        if self.cca_weight < 0 or self.cca_beta <= 0:
            raise ValueError(f"cca_weight must be >= 0 (0: off) and cca_beta > 0, got {self.cca_weight} and "
                             f"{self.cca_beta}")
        if self.cca_weight > 0 and not self.init_from:
            raise ValueError("cca_weight > 0 fine-tunes a trained prior against itself: give init_from=DIR (the "
                             "prior to align, kept frozen as the reference)")
        if self.cca_schedule not in ("constant", "linear"):
            raise ValueError(f"cca_schedule must be constant or linear, got {self.cca_schedule!r}")
        exact = (self.prior.mode == "ar" or self.prior.group_causal) and not self.prior.group_mixture
        if self.cca_weight > 0 and not exact:
            raise ValueError("cca_weight > 0 needs exact grid likelihoods: prior.mode=ar, or "
                             "prior.mask_attention=group_causal without prior.group_mixture")
        if self.distill_samples and not self.distill_from:
            raise ValueError(f"distill_samples={self.distill_samples} needs a teacher: give --teacher DIR (a trained "
                             "prior over the same tokenizer) or distill_from=DIR")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys with a message naming them.
    Fields whose default is itself a dataclass (sections such as ``model`` or ``optim``) are built recursively."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            # start from the field's own default (a section may set defaults that differ from its class's)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {type(value).__name__}")
            # Only the section defaults that differ from the class's own go in: the others are left for the class
            # to fill, so that a default derived from another field (in __post_init__) follows that field as set
            # here rather than being frozen at the value it took for the class's default.
            own = type(default)()
            changed = {k: v for k, v in _shallow_dict(default).items() if v != getattr(own, k)}
            section = _merge(changed, value or {})
            kwargs[name] = _build(type(default), section, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, hints.get(name), f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _shallow_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _check_type(value, hint, where: str):
    """Check (and gently coerce) a scalar/list config value against its annotation, e.g. ``steps=abc`` fails here
    with the key named instead of deep inside the training loop."""
    if hint is None:
        return value
    args = typing.get_args(hint)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not list else [hint]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    target = typing.get_origin(base[0]) or base[0] if len(base) == 1 else None
    if target in (int, float) and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if target is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if target is int and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if target is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if target is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if target is list and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list such as [1, 2], got {value!r}")
    if target is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return list(value) if target is list else value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def parse_overrides(items: list[str]) -> dict:
    """['model.codebook_size=1024', 'steps=10'] -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. steps=2000)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def default_prior_preset(data: str | None, mode: str) -> str:
    name = f"{data}-prior-{mode}"
    return name if (PRESET_DIR / f"{name}.yaml").is_file() else f"prior-{mode}"


def config_class(kind: str):
    if kind == "tokenizer":
        return TrainConfig
    if kind == "prior":
        return PriorTrainConfig
    if kind == "gan":
        from .gan import GANTrainConfig

        return GANTrainConfig
    raise ValueError(f"unknown config kind {kind!r}")


def default_preset(kind: str, data: str, mode: str | None = None) -> str | None:
    if kind == "prior":
        return default_prior_preset(data, mode or "ar")
    if kind == "gan":
        return {"mnist5k": "mnist-gan"}.get(data)
    return DEFAULT_PRESETS.get(data, FALLBACK_PRESET)


def resolve_config(data: str | None = None, preset: str | None = None, config_file: str | None = None,
                   overrides: list[str] | None = None, kind: str = "tokenizer", mode: str | None = None):
    """Defaults <- preset (named or chosen from the data source) <- YAML file <- key=value overrides <- --data
    (and --mode for priors). ``kind``: "tokenizer" (TrainConfig), "prior" (PriorTrainConfig) or "gan"."""
    values: dict = {}
    if preset is None and config_file is None and data:
        preset = default_preset(kind, str(data), mode)
    if preset:
        values = _merge(values, load_yaml(preset_path(preset)))
        values["preset"] = preset
    if config_file:
        values = _merge(values, load_yaml(config_file))
    if overrides:
        values = _merge(values, parse_overrides(overrides))
    if data:
        values = _merge(values, {"data": {"source": str(data)}})
    if mode:
        values = _merge(values, {"prior": {"mode": mode}})
    return _build(config_class(kind), values, "config")


def config_from_dict(d: dict, where: str = "config", kind: str = "tokenizer"):
    return _build(config_class(kind), d, where)
