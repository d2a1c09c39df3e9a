"""Generation: token datasets for prior training, loading a prior with its tokenizer, sampling to images."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.sources import ImageSource
from ..io import VQKitFileError, atomic_save_safetensors, read_json, read_safetensors, read_safetensors_metadata
from ..models.prior import TokenPrior
from ..models.tokenizer import VQModel


class TokenSet:
    """Token grids of one split, with the labels and captions of the images they came from.

    ``tensors()`` returns (tokens, row numbers) so that the trainer's batches carry rows and ``condition(rows)``
    can look up labels or captions for them.
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor | None, captions: list[str] | None,
                 name: str, split: str, conditioning: str = "none"):
        self.tokens, self.labels, self.captions = tokens.long(), labels, captions
        self.name, self.split, self.conditioning = name, split, conditioning

    def __len__(self) -> int:
        return len(self.tokens)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens, torch.arange(len(self.tokens))

    def describe(self) -> str:
        h, w = self.tokens.shape[-2:]
        return f"{self.name} [{self.split}]: {len(self)} token grids {h}x{w}, conditioning: {self.conditioning}"

    def condition(self, rows: torch.Tensor):
        rows = rows.long().cpu()
        if self.conditioning == "class":
            return {"labels": self.labels[rows]}
        if self.conditioning == "text":
            return {"captions": [self.captions[int(r)] for r in rows]}
        return None


def source_captions(source: ImageSource) -> list[str] | None:
    caps = getattr(source, "captions", None)
    return list(caps) if caps else None


def choose_conditioning(requested: str, source: ImageSource) -> str:
    if requested not in ("auto", "none", "class", "text"):
        raise ValueError(f"conditioning must be auto, none, class or text, got {requested!r}")
    has_text, has_labels = source_captions(source) is not None, source.has_labels
    if requested == "auto":
        return "text" if has_text else "class" if has_labels else "none"
    if requested == "class" and not has_labels:
        raise ValueError(f"{source.name}: conditioning=class, but this source has no labels")
    if requested == "text" and not has_text:
        raise ValueError(f"{source.name}: conditioning=text, but this source has no captions "
                         f"(put a captions.jsonl beside the images)")
    return requested


def pixel_offsets(radius: int) -> list[tuple[int, int]]:
    """Every whole-pixel (dy, dx) within ``radius`` (a square), (0, 0) first."""
    if radius < 0:
        raise ValueError(f"shift radius must be >= 0, got {radius}")
    others = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if (dy, dx) != (0, 0)]
    return [(0, 0), *others]


def shift_images(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images [N, C, H, W] moved by whole pixels (content moves down by dy, right by dx); the uncovered border
    repeats the edge pixels. Whole pixels because resampling blurs, and a blur is far from the data: bilinear
    rotations of 5 degrees put MNIST TRAIN at FD 2.5 from TEST where 1-pixel shifts give 0.43 (floor 0.36)."""
    if dy == 0 and dx == 0:
        return images
    H, W = images.shape[-2:]
    m = max(abs(dy), abs(dx))
    padded = torch.nn.functional.pad(images, (m, m, m, m), mode="replicate")
    return padded[..., m - dy:m - dy + H, m - dx:m - dx + W]


@torch.no_grad()
def tokenize_source(tokenizer: VQModel, source: ImageSource, batch_size: int = 250, progress: bool = True,
                    shift_radius: int = 0) -> torch.Tensor:
    """Token grids [N, h, w] of every image of ``source`` (its deterministic view). ``shift_radius`` r > 0 also
    tokenizes every image moved by each whole-pixel offset within r: (2r+1)^2 copies, the unshifted one first,
    so the result is [(2r+1)^2 * N, h, w], copy-major."""
    from ..evaluation import iterate_source

    device = next(tokenizer.parameters()).device
    offsets = pixel_offsets(shift_radius)
    grids: list[list[torch.Tensor]] = [[] for _ in offsets]
    n_batches = (len(source) + batch_size - 1) // batch_size
    for images, _ in tqdm(iterate_source(source, batch_size), total=n_batches, desc=f"tokenize {source.split}",
                          disable=not progress, leave=False):
        x = ((images.float() + 1) / 2).to(device)
        for copy, (dy, dx) in enumerate(offsets):
            grids[copy].append(tokenizer.tokenize(shift_images(x, dy, dx)).cpu())
    return torch.cat([g for copy in grids for g in copy])


def token_set(tokenizer: VQModel, source: ImageSource, conditioning: str, cache: Path | None = None,
              progress: bool = True, shift_radius: int = 0) -> TokenSet:
    """Tokenize a source (or read the tokens cached at ``cache``, when the same tokenizer weights wrote them for the
    same source, split and shift radius) into a TokenSet. With ``shift_radius`` > 0 the
    set also holds the tokens of every image shifted by whole pixels (see ``tokenize_source``), each copy keeping
    the image's label or caption: more distinct token grids of the same data for a prior that would overfit."""
    copies = len(pixel_offsets(shift_radius))
    # the tokenizer's weights are part of the key: a tokenizer retrained in place must not hand a resumed prior the
    # codes of its former self, which would mean other images
    made_by = {"tokenizer_fingerprint": model_fingerprint(tokenizer), "source": source.name, "split": source.split,
               "images": str(len(source)), "shift_radius": str(shift_radius)}
    tokens = None
    if cache is not None and cache.is_file() and read_safetensors_metadata(cache) == made_by:
        tokens = read_safetensors(cache)["tokens"]
    if tokens is None:
        tokens = tokenize_source(tokenizer, source, progress=progress, shift_radius=shift_radius)
        if cache is not None:
            atomic_save_safetensors(cache, {"tokens": tokens}, metadata=made_by)
    labels = getattr(source, "labels", None)
    if labels is None and source.has_labels:
        labels = torch.tensor([source[i][1] for i in range(len(source))])
    captions = source_captions(source)
    if copies > 1:
        labels = None if labels is None else torch.as_tensor(labels).repeat(copies)
        captions = None if captions is None else captions * copies
    return TokenSet(tokens, labels, captions, source.name, source.split, conditioning)


def load_prior_of_tokenizer(prior_dir: str | Path, tokenizer_dir: str | Path, option: str,
                            device: str | torch.device = "cpu") -> TokenPrior:
    """The trained prior in ``prior_dir`` for a run over ``tokenizer_dir`` (``option`` names the setting that asked
    for it, e.g. distill_from or init_from); refused when there is none or when it belongs to another tokenizer,
    whose codes would mean other images."""
    from ..training.config import ConfigError

    prior_dir = Path(prior_dir)
    if not (prior_dir / "config.json").is_file():
        raise ConfigError(f"{option}: {prior_dir} holds no trained prior (no config.json)")
    prior = TokenPrior.from_pretrained(prior_dir, device=device)
    recorded = resolve_tokenizer_path(prior_dir, prior.config.tokenizer)
    if recorded.resolve() != Path(tokenizer_dir).resolve():
        raise ConfigError(f"{option}: the prior in {prior_dir} belongs to the tokenizer {recorded}, not "
                          f"{tokenizer_dir}; its codes would mean other images")
    return prior


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short SHA-256 over a model's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:16]


def with_teacher_samples(train: TokenSet, teacher_dir: str | Path, tokenizer_dir: str | Path, n: int,
                         cache: Path | None = None, seed: int = 0, progress: bool = True,
                         batch_size: int = 256, device: str | torch.device = "cpu") -> TokenSet:
    """``train`` plus ``n`` grids sampled from the prior in ``teacher_dir`` (sequence-level distillation).

    The teacher must belong to the same tokenizer and condition the same way; it is sampled with its saved settings,
    the i-th grid with TRAIN's (i mod N)-th label or caption, so the synthetic set keeps TRAIN's class balance. The
    grids are cached at ``cache`` (keyed by the teacher's path, weights and saved settings, ``n`` and ``seed``), so a
    resumed run trains on the same data and a teacher changed in place is sampled again.
    """
    from ..training.config import ConfigError

    teacher_dir = Path(teacher_dir)
    teacher = load_prior_of_tokenizer(teacher_dir, tokenizer_dir, "distill_from", device)
    tc = teacher.config
    wanted = {"class": "class labels", "text": "captions", "none": "no condition"}[train.conditioning]
    has = "class labels" if tc.num_classes else "captions" if tc.text_vocab else "no condition"
    if has != wanted or (tc.num_classes and int(torch.as_tensor(train.labels).max()) >= tc.num_classes):
        raise ConfigError(f"distill_from: the prior in {teacher_dir} is conditioned on {has}, this run on {wanted}")
    sampling_file = teacher_dir / "sampling.json"
    sampling = read_json(sampling_file, "sampling defaults") if sampling_file.is_file() else {}
    kwargs = sampling_kwargs(sampling, teacher)
    # the teacher's weights and sampling settings are part of the key: a teacher retrained or re-tuned in place must
    # not hand a resumed student the grids of its former self
    drawn_for = {"teacher": str(teacher_dir.resolve()), "samples": str(n), "seed": str(seed),
                 "teacher_fingerprint": model_fingerprint(teacher),
                 "teacher_sampling": json.dumps(kwargs, sort_keys=True)}
    grids = None
    if cache is not None and cache.is_file() and read_safetensors_metadata(cache) == drawn_for:
        grids = read_safetensors(cache)["tokens"]
    cycle = torch.arange(n) % len(train)
    labels = None if train.labels is None else torch.as_tensor(train.labels)[cycle]
    captions = None if train.captions is None else [train.captions[int(i)] for i in cycle]
    if grids is None:
        chunks = []
        for chunk, rows in enumerate(tqdm(torch.arange(n).split(batch_size * 4), desc="distill: teacher samples",
                                          disable=not progress, leave=False)):
            condition = ({"labels": labels[rows]} if labels is not None else
                         {"captions": [captions[int(r)] for r in rows]} if captions is not None else None)
            chunks.append(teacher.sample(len(rows), condition, seed=seed + chunk, batch_size=batch_size,
                                         **kwargs).cpu())
        grids = torch.cat(chunks)
        if cache is not None:
            atomic_save_safetensors(cache, {"tokens": grids}, metadata=drawn_for)
    return TokenSet(torch.cat([train.tokens, grids]),
                    None if labels is None else torch.cat([torch.as_tensor(train.labels), labels]),
                    None if captions is None else [*train.captions, *captions],
                    train.name, f"{train.split}+{n} teacher samples", train.conditioning)


def sampling_kwargs(sampling, prior: TokenPrior, **overrides) -> dict:
    """Keyword arguments for TokenPrior.sample from a SamplingConfig (or dict), with non-None overrides applied."""
    values = dataclasses.asdict(sampling) if dataclasses.is_dataclass(sampling) else dict(sampling)
    values.update({k: v for k, v in overrides.items() if v is not None})
    has_condition = prior.config.num_classes is not None or prior.config.text_vocab is not None
    if not has_condition:
        values["guidance_scale"] = 1.0  # guidance needs a conditional prior
    return values


@torch.no_grad()
def decode_samples(tokenizer: VQModel, grids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Token grids -> images [N, C, H, W] in [0, 1] at the tokenizer's training resolution."""
    device = next(tokenizer.parameters()).device
    size = (tokenizer.config.image_size, tokenizer.config.image_size)
    return torch.cat([tokenizer.detokenize(g.to(device), size=size).cpu() for g in grids.split(batch_size)])


def resolve_tokenizer_path(prior_dir: Path, recorded: str | None) -> Path:
    """The tokenizer a prior belongs to: recorded relative to the prior's directory, or absolute."""
    if not recorded:
        raise VQKitFileError(f"{prior_dir}: this prior records no tokenizer")
    candidates = [prior_dir / recorded, Path(recorded)]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise VQKitFileError(f"{prior_dir}: its tokenizer {recorded!r} was not found (looked in "
                         f"{', '.join(str(c) for c in candidates)})")


def record_tokenizer_path(prior_dir: Path, tokenizer_dir: Path) -> str:
    """How a prior records its tokenizer: relative when both live under one folder (so the pair can move)."""
    try:
        return os.path.relpath(Path(tokenizer_dir).resolve(), Path(prior_dir).resolve())
    except ValueError:  # different drives
        return str(Path(tokenizer_dir).resolve())


def load_generator(prior_dir: str | Path, device: str | torch.device | None = None):
    """(prior, tokenizer, sampling defaults dict) from a prior directory written by `vqkit train prior`."""
    prior_dir = Path(prior_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prior = TokenPrior.from_pretrained(prior_dir, device=device)
    tokenizer = VQModel.from_pretrained(resolve_tokenizer_path(prior_dir, prior.config.tokenizer), device=device)
    if tokenizer.config.codebook_size != prior.config.codebook_size:
        raise VQKitFileError(f"{prior_dir}: prior over K={prior.config.codebook_size} codes, but its tokenizer has "
                             f"K={tokenizer.config.codebook_size}")
    sampling_file = prior_dir / "sampling.json"
    sampling = read_json(sampling_file, "sampling defaults") if sampling_file.is_file() else {}
    return prior, tokenizer, sampling
