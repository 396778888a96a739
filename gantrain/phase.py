"""What the Trainer runs: a :class:`Phase` is one kind of optimizer step, built by an objective.

An objective (``loss=`` group) receives one :class:`~gantrain.optim.Update` per trained network (built from
``optim.<net>``: the optimizer, its LR schedule and its clipping) and returns complete phases with
:meth:`Phase.of`. This module imports no logging or checkpoint code, so losses stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from gantrain.optim import Schedule, Update
from gantrain.settings import CLIP_ALGORITHMS, check_clipping  # noqa: F401 - both were importable from here

__all__ = ["Phase", "Update"]


@dataclass
class Phase:
    """One kind of optimizer step: ``loss(batch, step)`` is minimised w.r.t. ``module`` by ``update``'s optimizer.
    ``batch`` is the :class:`~gantrain.batch.Batch` the data stream yields; ``step`` is the number of optimizer steps
    this phase has taken before (lazy regularisers use it). ``update``: the network's :class:`~gantrain.optim.Update`; a
    bare optimizer stands for one without schedule or clipping. ``interval``: run on iterations
    ``interval-1, 2*interval-1, ...`` (so a G phase with interval ``n_critic`` follows ``n_critic`` D updates).
    ``counts_as_step``: this phase's optimizer steps are the ones ``trainer.max_steps`` counts (exactly one phase has
    it). ``after_step``: called (no grad) after each optimizer step, e.g. weight clipping. ``no_sync_loss``: the loss
    for the micro-batches of an accumulation window but the last, whose gradients are not yet all-reduced across ranks
    (set by :func:`gantrain.distributed.replicate`; None = ``loss``)."""

    name: str
    module: nn.Module
    update: Update
    loss: Callable[..., torch.Tensor]
    interval: int = 1
    counts_as_step: bool = False
    after_step: Optional[Callable[[], None]] = None
    no_sync_loss: Optional[Callable[..., torch.Tensor]] = None

    def __post_init__(self) -> None:
        if isinstance(self.update, Optimizer):
            self.update = Update(self.update)

    @classmethod
    def of(cls, name: str, module: nn.Module, update: Update, loss: Callable, **kwargs) -> "Phase":
        """A phase that steps ``module`` with ``update``'s optimizer, schedule and clipping."""
        return cls(name, module, update, loss, **kwargs)

    @property
    def optimizer(self) -> Optimizer:
        return self.update.optimizer

    @property
    def schedule(self) -> Optional[Schedule]:
        return self.update.schedule

    @property
    def gradient_clip_val(self) -> Optional[float]:
        return self.update.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> Optional[str]:
        return self.update.gradient_clip_algorithm
