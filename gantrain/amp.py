"""Mixed precision pieces shared by the Trainer and the losses.

The Trainer makes the running phase's :class:`torch.amp.GradScaler` the *active* scaler (a context, like
:func:`gantrain.stats.collecting`), so a loss that needs input gradients inside its forward pass (gradient penalty, R1)
can follow PyTorch's AMP recipe without knowing about precision: scale the output before ``torch.autograd.grad``,
unscale the gradients, and compute the penalty from them under the surrounding autocast. With no scaler, or a disabled
one (``precision=32`` / ``bf16-mixed``), the scale is 1 and the same code path runs.

A scaled input gradient can overflow in fp16 (the scaler grows its scale until something does), making the loss
inf/NaN although nothing diverged. :func:`input_gradient` records such overflows in the list :func:`scaling` yields,
so the Trainer leaves those steps to the scaler (skipped, scale backed off) instead of calling the loss non-finite.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_active: "torch.amp.GradScaler | None" = None
_overflows: list[torch.Tensor] = []  # of the innermost scaling() block


@contextmanager
def scaling(scaler: "torch.amp.GradScaler") -> Iterator[list[torch.Tensor]]:
    """Make ``scaler`` the one :func:`input_gradient` uses inside the block; yields the list of its
    overflow flags (0-d bool tensors, one per input gradient taken under an enabled scaler)."""
    global _active, _overflows
    previous, _active = (_active, _overflows), scaler
    _overflows = []
    try:
        yield _overflows
    finally:
        _active, _overflows = previous


def loss_scale(like: torch.Tensor) -> torch.Tensor:
    """The active scaler's current scale as a 0-d tensor on ``like``'s device (1 when none is enabled). Read as a tensor
    (``scaler.scale(ones)``), so it costs no host synchronisation."""
    one = torch.ones((), device=like.device, dtype=torch.float32)
    return one if _active is None else _active.scale(one)


def input_gradient(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``∇_x output.sum()`` with ``create_graph=True``, loss-scaled under fp16 and unscaled again. Scaling keeps small
    fp16 gradients from flushing to zero in the backward pass; an overflow becomes inf in the result, then in the loss,
    and the scaler skips that optimizer step."""
    scale = loss_scale(output)
    (grad,) = torch.autograd.grad(output.sum() * scale, x, create_graph=True)
    if _active is not None and _active.is_enabled():  # overflowed: a finite output, a non-finite scaled gradient
        _overflows.append(torch.isfinite(output).all() & ~torch.isfinite(grad).all())
    return grad / scale
