"""One stats sink for the whole package.

Anything that wants a number in TensorBoard and in the progress bar calls ``report(name, value)``
with a slash-separated name (``loss/D``, ``loss/D/gp``, ``D(x)``). The Trainer owns the
:class:`Collector` that receives the values and drains it at logging time, so losses and models
never hold a writer. Outside a training run ``report`` is a no-op.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

_active: "Collector | None" = None


class Collector:
    """Accumulates reported values between two ``drain()`` calls (means per name).

    Between ``hold()`` and ``release(keep)`` the values wait, in report order, in the list ``hold()``
    returns: the Trainer checks one optimizer step's loss terms there and logs them only if that step
    is applied (the values of a skipped step would put a NaN into the means).
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)
        self._held: list[tuple[str, torch.Tensor]] = []  # one list, reused by every hold()
        self._holding = False

    def add(self, name: str, value: torch.Tensor | float) -> None:
        # Keep tensors on their device and detached: no host sync per step, only at drain().
        v = value.detach().float().mean() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if self._holding:
            self._held.append((name, v))
        else:
            self._accumulate(name, v)

    def _accumulate(self, name: str, v: torch.Tensor) -> None:
        self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._counts[name] += 1

    def hold(self) -> list[tuple[str, torch.Tensor]]:
        """Hold back what is reported from now on; returns the (name, value) list it goes to."""
        self._held.clear()
        self._holding = True
        return self._held

    def release(self, keep: bool) -> None:
        """Stop holding; the held values count in the means if ``keep``, else they are dropped."""
        if keep:
            for name, v in self._held:
                self._accumulate(name, v)
        self._held.clear()
        self._holding = False

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


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity (one host sync), else None."""
    floats = {name: t for name, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(t).all() for t in floats.values()]).tolist()
    return next((name for name, ok in zip(floats, finite) if not ok), None)
