"""What the Trainer runs: a :class:`Phase` is one kind of optimizer step, built by an objective.

An objective (``loss=`` group) receives one :class:`Update` per trained network (built from
``optim.<net>``: the optimizer, its LR schedule and its clipping) and returns complete phases with
:meth:`Phase.of`. This module imports no logging or checkpoint code, so losses stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from gantrain import checks

if TYPE_CHECKING:
    from gantrain.optim import Schedule


CLIP_ALGORITHMS = ("norm", "value")


def check_clipping(gradient_clip_val: Optional[float], gradient_clip_algorithm: Optional[str]) -> None:
    """A network's own clipping: None = the trainer's setting; a value of 0 = no clipping for it."""
    if gradient_clip_val is not None:
        checks.number("gradient_clip_val", gradient_clip_val, ge=0, hint="0 = no clipping; null = the trainer's")
    checks.choice("gradient_clip_algorithm", gradient_clip_algorithm, (None, *CLIP_ALGORITHMS))


@dataclass
class Update:
    """How one network's optimizer steps (``optim.<net>``, see :class:`gantrain.optim.NetworkOptim`).

    ``schedule``: the LR schedule (None = constant); ``gradient_clip_val``/``_algorithm``: this
    network's clipping (None = the trainer's setting; a value of 0 = no clipping for it).
    """

    optimizer: Optimizer
    schedule: Optional[Schedule] = None
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None

    def __post_init__(self) -> None:
        check_clipping(self.gradient_clip_val, self.gradient_clip_algorithm)


@dataclass
class Phase:
    """One kind of optimizer step: ``loss(real_batch, step)`` is minimised w.r.t. ``module`` by ``optimizer``.

    ``step`` is the number of optimizer steps this phase has taken before (lazy regularisers use it).
    ``interval``: run on iterations ``interval-1, 2*interval-1, ...`` (so a G phase with interval
    ``n_critic`` follows ``n_critic`` D updates). ``counts_as_step``: this phase's optimizer steps are
    the ones ``trainer.max_steps`` counts (exactly one phase has it). ``after_step``: called (no grad)
    after each optimizer step, e.g. weight clipping. ``schedule``: the LR schedule of this phase's
    optimizer (:class:`gantrain.optim.Schedule`; None = constant), stepped after each of its
    optimizer steps. ``gradient_clip_val``/``gradient_clip_algorithm``: this phase's clipping
    (None = the trainer's setting; a value of 0 = no clipping for this phase). ``no_sync_loss``: the
    loss for the micro-batches of an accumulation window but the last, whose gradients are not yet
    all-reduced across ranks (set by :func:`gantrain.distributed.replicate`; None = ``loss``).
    """

    name: str
    module: nn.Module
    optimizer: Optimizer
    loss: Callable[[torch.Tensor, int], torch.Tensor]
    interval: int = 1
    counts_as_step: bool = False
    after_step: Optional[Callable[[], None]] = None
    schedule: Optional[Schedule] = None
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None
    no_sync_loss: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None

    def __post_init__(self) -> None:
        check_clipping(self.gradient_clip_val, self.gradient_clip_algorithm)

    @classmethod
    def of(cls, name: str, module: nn.Module, update: Update, loss: Callable, **kwargs) -> "Phase":
        """A phase that steps ``module`` with ``update``'s optimizer, schedule and clipping."""
        return cls(
            name,
            module,
            update.optimizer,
            loss,
            schedule=update.schedule,
            gradient_clip_val=update.gradient_clip_val,
            gradient_clip_algorithm=update.gradient_clip_algorithm,
            **kwargs,
        )
