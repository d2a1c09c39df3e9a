"""One training loop for every model vqkit trains.

The loop owns what all runs share: the deterministic batch schedule, the progress bar, metrics.jsonl and TensorBoard,
atomic checkpoints and exact resume, and distributed setup. What is trained is a *task* (see tasks.py): it owns its
modules and optimizers, performs one training step on a batch, writes its pictures, and evaluates at the end.

Batches are a pure function of (seed, step, rank): the permutation of an epoch is drawn from a generator seeded with
(seed, epoch), and random augmentation from one seeded with (seed, step, rank). So a resumed run sees exactly the
batches an uninterrupted run would have seen, without storing any sampler state.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed as D
from ..data.sources import ImageSource
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig


class Task(Protocol):
    """What a Trainer trains. See tasks.TokenizerTask for the reference implementation."""

    def state(self) -> dict: ...  # everything to checkpoint (module and optimizer state dicts, extra counters)

    def load_state(self, state: dict) -> None: ...

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]: ...

    def write_images(self, out_dir: Path, step: int) -> None: ...

    def finish(self, out_dir: Path) -> dict: ...  # save the final model, evaluate, return the evaluation


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Global batch of dataset indices for ``step`` (without replacement within an epoch, drop_last)."""
    if n >= batch_size:
        per_epoch = n // batch_size
        epoch, i = divmod(step, per_epoch)
        return epoch_permutation(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # tiny sets: sample with replacement
    return torch.randint(n, (batch_size,), generator=g)


class _SeededView(torch.utils.data.Dataset):
    """Dataset over (index, seed) pairs so that DataLoader workers apply reproducible augmentation."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        index, seed = item
        rng = np.random.default_rng(seed) if seed is not None else None
        image, label = self.source.get(index, rng)
        return image, label


class _StepSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, cfg: TrainConfig, start: int, stop: int, rank: int, world: int):
        self.n, self.cfg, self.start, self.stop, self.rank, self.world = n, cfg, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = batch_indices(self.n, self.cfg.batch_size, self.cfg.seed, step)[self.rank::self.world]
            yield [(int(i), self.cfg.seed * 1_000_003 + step * 997 + self.rank * 7 + j) for j, i in enumerate(idx)]


def iterate_batches(source: ImageSource, cfg: TrainConfig, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rank, world = D.rank(), D.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    tensors = getattr(source, "tensors", None)
    if tensors is not None:  # in-memory arrays without augmentation: index directly (much faster than a DataLoader)
        data, labels = tensors()
        for step in range(start, stop):
            idx = batch_indices(len(source), cfg.batch_size, cfg.seed, step)[rank::world]
            yield data[idx], (labels[idx] if labels is not None else torch.full((len(idx),), -1, dtype=torch.long))
        return
    loader = torch.utils.data.DataLoader(
        _SeededView(source), batch_sampler=_StepSampler(len(source), cfg, start, stop, rank, world),
        num_workers=cfg.data.num_workers, persistent_workers=False)
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.long)


def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule != "cosine":
        raise ValueError(f"optim.schedule must be cosine or constant, got {o.schedule!r}")
    t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars, written by the main process."""

    def __init__(self, out_dir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # forget lines logged after the checkpoint we resume from
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step)
        except Exception:  # tensorboard missing or broken: the JSON log is enough
            self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, out_dir: str | Path, source: ImageSource,
                 resume: bool = False, stop_at: int | None = None, progress: bool = True):
        self.task, self.cfg, self.source = task, cfg, source
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.resume = resume
        self.stop_at = stop_at  # end this process at this step (as if interrupted); the run itself targets cfg.steps
        self.progress = progress
        self.main = D.is_main_process()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, step: int) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": step, "task": self.task.state(), "rng": rng}

    def save(self, step: int) -> None:
        state = self._checkpoint_state(step)  # every rank builds it (keeps collectives aligned), rank 0 writes
        if self.main:
            save_checkpoint(self.ckpt_dir, step, state, keep=self.cfg.keep_checkpoints)
        D.barrier()

    def _restore(self) -> int:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
        state = load_checkpoint(path)
        self.task.load_state(state["task"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return int(state["step"])

    # ------------------------------------------------------------------------------------------------------- loop
    def run(self) -> dict | None:
        cfg = self.cfg
        start = self._restore() if self.resume else 0
        stop = cfg.steps if self.stop_at is None else min(cfg.steps, self.stop_at)
        log = MetricsLog(self.out_dir, start if self.resume else None, self.main)
        bar = tqdm(total=cfg.steps, initial=start, disable=not (self.main and self.progress), desc="train",
                   dynamic_ncols=True, smoothing=0.05)
        interrupted = {"flag": False}

        def on_signal(signum, frame):
            # First Ctrl-C / SIGTERM: finish the current step, write a checkpoint, stop. A second Ctrl-C aborts.
            if interrupted["flag"] and signum == signal.SIGINT:
                raise KeyboardInterrupt
            interrupted["flag"] = True

        handlers = {}
        if self.main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    handlers[sig] = signal.signal(sig, on_signal)
                except ValueError:  # not the main thread: keep the default behaviour
                    pass
        step = start
        t0 = time.time()
        try:
            for images, labels in iterate_batches(self.source, cfg, start, stop):
                logs = self.task.train_step(images, labels, step)
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == stop:
                    logs["seconds"] = time.time() - t0
                    log.log(step, logs)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in self.task.progress_keys})
                if self.main and cfg.image_every and step % cfg.image_every == 0:
                    self.task.write_images(self.out_dir, step)
                stopping = D.any_flag(interrupted["flag"])  # every rank must agree to stop at the same step
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == stop or stopping:
                    self.save(step)
                if stopping:
                    if self.main:
                        bar.write(f"interrupted at step {step}; checkpoint written. Continue with --resume.")
                    break
        finally:
            bar.close()
            log.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        if step < cfg.steps:
            return None  # stopped early: the checkpoint is there for --resume
        return self.task.finish(self.out_dir)
