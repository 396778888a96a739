"""Exponential moving average of a network's weights (Karras et al. 2020, stylegan2-ada style).

The decay is given as a half-life in *images*, so it does not depend on the batch size: after a step that consumed ``n``
images, ``beta = 0.5 ** (n / half_life_images)`` and ``ema = beta * ema + (1 - beta) * weights``. Buffers (BatchNorm
statistics, spectral-norm vectors) are copied, not averaged.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger("gantrain.checkpoint")


class EMA:
    """A frozen, eval-mode copy of ``module`` that tracks its weights (``half_life_images`` > 0). ``swapped()``
    temporarily loads the average into ``module`` itself: samplers holding it use it unknowingly."""

    def __init__(self, module: nn.Module, half_life_images: float, name: str = ""):
        self.module, self.name = module, name  # name: the network's in the model ("g"), saved with the weights
        self.half_life_images = float(half_life_images)
        self.average = copy.deepcopy(module).eval().requires_grad_(False)

    def beta(self, images: int) -> float:
        return 0.5 ** (images / self.half_life_images)

    @torch.no_grad()
    def update(self, images: int) -> None:
        """One EMA step after an optimizer step of ``module`` that consumed ``images`` images."""
        weight = 1.0 - self.beta(images)
        for avg, p in zip(self.average.parameters(), self.module.parameters()):
            avg.lerp_(p.detach().to(avg.dtype), weight)
        for avg, b in zip(self.average.buffers(), self.module.buffers()):
            avg.copy_(b)

    @contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Inside the block ``module`` holds the averaged parameters; its own come back afterwards."""
        live = [p.detach().clone() for p in self.module.parameters()]
        with torch.no_grad():
            for p, avg in zip(self.module.parameters(), self.average.parameters()):
                p.copy_(avg)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for p, saved in zip(self.module.parameters(), live):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.name, "half_life_images": self.half_life_images, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["average"])

    @torch.no_grad()
    def restart(self, source: str) -> None:
        """A resume from ``source``, which has no EMA weights: average afresh from the network's current weights
        (in place: references stay valid)."""
        log.warning("trainer.resume: %s has no EMA weights; the EMA starts from the current weights", source)
        self.average.load_state_dict(self.module.state_dict())
