"""What every vqkit model shares: a versioned config dataclass and a directory of config.json + model.safetensors
(the diffusers convention), written atomically and read back with errors that name the file."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..io import VQKitFileError, atomic_save_safetensors, atomic_write_json, read_json, read_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def config_from_dict(cls, d: dict, source: str, max_version: int):
    """Build config dataclass ``cls`` from a dict read from disk: refuse configs from a newer vqkit, warn about and
    ignore unknown keys (older vqkit versions may add some), and turn invalid values into a VQKitFileError."""
    d = dict(d)
    version = int(d.get("config_version", 1))
    if version > max_version:
        raise VQKitFileError(f"{source}: config_version {version} was written by a newer vqkit "
                             f"(this one reads up to {max_version}); upgrade vqkit")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown config keys {unknown}")
    try:
        return cls(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise VQKitFileError(f"{source}: {e}") from None


class PretrainedMixin:
    """save_pretrained / from_pretrained for an nn.Module with ``self.config`` (a dataclass with ``to_dict`` and
    ``from_dict(d, source)``). Subclasses set MODEL_TYPE and CONFIG_CLASS."""

    MODEL_TYPE: str = ""
    CONFIG_CLASS: type = object

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # weights first, config last: a directory with a config.json always has matching weights
        atomic_save_safetensors(path / WEIGHTS_NAME, self.state_dict(), metadata={"format": "pt", "library": "vqkit"})
        atomic_write_json(path / CONFIG_NAME, {"model_type": self.MODEL_TYPE, **self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_dir():
            raise VQKitFileError(f"{path}: not a directory (expected a vqkit model directory with "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME})")
        raw = read_json(path / CONFIG_NAME, "model config")
        if not isinstance(raw, dict):
            raise VQKitFileError(f"{path / CONFIG_NAME}: expected a JSON object")
        model_type = raw.pop("model_type", cls.MODEL_TYPE)
        if model_type != cls.MODEL_TYPE:
            raise VQKitFileError(f"{path / CONFIG_NAME}: holds a {model_type}, not a {cls.MODEL_TYPE}")
        model: nn.Module = cls(cls.CONFIG_CLASS.from_dict(raw, source=str(path / CONFIG_NAME)))
        state = read_safetensors(path / WEIGHTS_NAME)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # tensors of other shapes (e.g. another codebook_size) than config.json describes
            raise VQKitFileError(f"{path / WEIGHTS_NAME}: weights do not match {CONFIG_NAME} ({e})") from None
        if missing or unexpected:
            raise VQKitFileError(f"{path / WEIGHTS_NAME}: weights do not match {CONFIG_NAME} "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.to(device).eval()

    @contextlib.contextmanager
    def _eval_mode(self):
        """Evaluation mode (no dropout, frozen BatchNorm statistics, no codebook updates) for the duration, then the
        previous mode back: inference methods must not change what training does next."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
