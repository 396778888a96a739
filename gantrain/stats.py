"""One stats sink for the whole package.

Anything that wants a number in TensorBoard and in the progress bar calls ``report(name, value)`` with a slash-separated
name (``loss/D``, ``loss/D/gp``, ``D(x)``). The Trainer owns the :class:`Collector` that receives the values and drains
it at logging time, so losses and models never hold a writer. Outside a training run ``report`` is a no-op.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

_active: "Collector | None" = None


FOLD = 256  # values of one name kept as references before they are summed into one tensor (no host sync)


class _Series:
    """One name's values since the last drain: Python numbers summed as numbers, tensors kept as references."""

    __slots__ = ("count", "numbers", "tensors", "partial")

    def __init__(self) -> None:
        self.count, self.numbers = 0, 0.0
        self.tensors: list[torch.Tensor] = []
        self.partial: torch.Tensor | None = None  # the sum of earlier tensors, folded every FOLD values

    def add(self, v: torch.Tensor | float) -> None:
        self.count += 1
        if not isinstance(v, torch.Tensor):
            self.numbers += v
            return
        self.tensors.append(v)
        if len(self.tensors) == FOLD:  # a long logging interval holds FOLD references at most
            self.partial, self.tensors = self.tensor_sum(), []

    def tensor_sum(self) -> torch.Tensor | None:
        parts = [t.float() for t in self.tensors] + ([] if self.partial is None else [self.partial])
        return torch.stack(parts).sum() if parts else None


class Collector:
    """Collects reported values between two ``drain()`` calls (means per name).

    A report costs no device work (a scalar tensor is kept as a detached reference, a number as a number), so a
    step between logging steps never waits for the device; ``drain()`` reduces them with one host sync. A tensor of
    more than one element counts as its mean; a reported tensor must not be changed in place afterwards.

    Between ``hold()`` and ``release(keep)`` the values wait, in report order, in the list ``hold()`` returns: the
    Trainer checks one step's loss terms there and logs them only if the step is applied (a skipped one's NaN
    would spoil the means).
    """

    def __init__(self) -> None:
        self._series: dict[str, _Series] = {}
        self._held: list[tuple[str, torch.Tensor | float]] = []  # one list, reused by every hold()
        self._holding = False

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            v = value.detach()  # a view: the graph is released, nothing is computed
            if v.dim():
                v = v.float().mean()
        else:
            v = float(value)
        if self._holding:
            self._held.append((name, v))
        else:
            self._accumulate(name, v)

    def _accumulate(self, name: str, v: torch.Tensor | float) -> None:
        series = self._series.get(name)
        if series is None:
            series = self._series[name] = _Series()
        series.add(v)

    def hold(self) -> list[tuple[str, torch.Tensor | float]]:
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
        """Means of everything reported since the last drain, as Python floats (one host sync per device); then
        reset."""
        sums = {name: s.tensor_sum() for name, s in self._series.items()}
        by_device: dict[torch.device, list[str]] = defaultdict(list)
        for name, total in sums.items():
            if total is not None:
                by_device[total.device].append(name)
        read: dict[str, float] = {}
        for names in by_device.values():
            read.update(zip(names, torch.stack([sums[n] for n in names]).tolist()))
        out = {name: (s.numbers + read.get(name, 0.0)) / s.count for name, s in self._series.items()}
        self._series.clear()
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
