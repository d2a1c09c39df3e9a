"""An exponential moving average of a model's weights, for priors whose averaged weights sample better."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """Keeps ``averaged``, a frozen copy of ``model`` whose parameters follow ``decay * avg + (1 - decay) * current``
    after every update. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so that the
    average is not dominated by the random initial weights in short runs. Buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.averaged = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, current in zip(self.averaged.parameters(), model.parameters()):
            avg.lerp_(current.detach(), 1 - decay)
        for avg, current in zip(self.averaged.buffers(), model.buffers()):
            avg.copy_(current)

    def state(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates}

    def load_state(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])
