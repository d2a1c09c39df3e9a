"""Training checkpoints: one safetensors file per checkpoint, written atomically, never unpickled.

Everything that resuming needs (model and optimizer states, RNG states, step, arbitrary JSON-able trainer state) is
split into tensors, stored as safetensors tensors, and a JSON tree with placeholders, stored in the file's metadata.
Loading rebuilds the nested structure; no pickle is involved at any point.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..io import VQKitFileError, atomic_save_safetensors, read_safetensors, read_safetensors_metadata

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"
CKPT_PATTERN = re.compile(r"^step_(\d+)\.safetensors$")


def flatten_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure of dicts/lists/tensors/scalars into (JSON tree, {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if torch.is_tensor(o):
            tensors[path] = o.detach().cpu().clone() if o.dim() == 0 else o.detach().cpu()
            return {_TENSOR: path}
        if isinstance(o, dict):
            int_keys = bool(o) and all(isinstance(k, int) for k in o)  # optimizer state is keyed by param index
            tree = {str(k): walk(v, f"{path}/{k}") for k, v in o.items()}
            return {_INTKEYS: tree} if int_keys else tree
        if isinstance(o, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot checkpoint a value of type {type(o).__name__} at {path}")

    return walk(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        if set(tree) == {_TUPLE}:
            return tuple(unflatten_state(v, tensors) for v in tree[_TUPLE])
        if set(tree) == {_INTKEYS}:
            return {int(k): unflatten_state(v, tensors) for k, v in tree[_INTKEYS].items()}
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``directory/step_XXXXXXXX.safetensors`` atomically, then prune all but the newest ``keep``."""
    directory = Path(directory)
    tree, tensors = flatten_state(state)
    if not tensors:  # safetensors needs at least one tensor
        tensors["s/__empty__"] = torch.zeros(1)
    path = directory / f"step_{step:08d}.safetensors"
    atomic_save_safetensors(path, tensors, metadata={"vqkit_state": json.dumps(tree), "step": str(step)})
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    meta = read_safetensors_metadata(path)
    if "vqkit_state" not in meta:
        raise VQKitFileError(f"{path}: not a vqkit training checkpoint (no vqkit_state metadata)")
    try:
        tree = json.loads(meta["vqkit_state"])
    except json.JSONDecodeError as e:
        raise VQKitFileError(f"{path}: checkpoint metadata is corrupt ({e})") from None
    return unflatten_state(tree, read_safetensors(path))
