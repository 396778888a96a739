"""One stats sink for the whole package.

Anything that wants a number in TensorBoard and in the progress bar calls ``report(name, value)``
with a slash-separated name (``loss/D``, ``loss/D/gp``, ``D(x)``). The Trainer owns the
:class:`Collector` that receives the values and drains it at logging time, so losses and models
never hold a writer. Outside a training run ``report`` is a no-op.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

_active: "Collector | None" = None


class Collector:
    """Accumulates reported values between two ``drain()`` calls (means per name)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        # Keep tensors on their device and detached: no host sync per step, only at drain().
        v = value.detach().float().mean() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._counts[name] += 1

    def drain(self) -> dict[str, float]:
        """Means of everything reported since the last drain, as Python floats; then reset."""
        out = {k: (s / self._counts[k]).item() for k, s in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out


def report(name: str, value: torch.Tensor | float) -> None:
    """Send one scalar (or the mean of a tensor) to the active collector, if any."""
    if _active is not None:
        _active.add(name, value)


@contextmanager
def collecting(collector: Collector) -> Iterator[Collector]:
    """Make ``collector`` the destination of ``report`` inside the block."""
    global _active
    previous, _active = _active, collector
    try:
        yield collector
    finally:
        _active = previous
