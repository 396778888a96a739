"""What a checkpoint holds, registered once: :class:`TrainingState` maps a name to each stateful part of a run.

The Trainer registers its own parts (the model, the optimizers, LR schedulers and loss scalers, the non-finite
guard, the EMA, the data stream, the RNGs); ``build()`` adds what the objective declares
(:meth:`gantrain.objectives.GANObjective.state_parts`: every loss term that subclasses :class:`Stateful`, under its
config key, e.g. ``loss.adversarial``) and every callback that declares a ``state_key`` (the evaluation's best
value, the last logged values). A checkpoint is ``{name: part.state_dict()}`` plus the step counters, and a
resume calls each part's ``load_state_dict`` in registration order, so a new stateful part needs no edit to
:mod:`gantrain.checkpoint`: it subclasses :class:`Stateful` (a loss term) or sets ``state_key`` (a callback).
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np
import torch

from gantrain.errors import CheckpointError

log = logging.getLogger(__name__)


class Stateful(ABC):
    """Declares that an object's state belongs in the checkpoint: subclass it (a loss term with a running value, an
    adaptive augmentation probability) and the objective registers it; a resumed run continues it exactly.
    ``state_dict()``: a picklable snapshot (checkpoints load on the CPU); ``load_state_dict(state)`` restores it."""

    @abstractmethod
    def state_dict(self) -> Any: ...

    @abstractmethod
    def load_state_dict(self, state: Any) -> None: ...


class Mismatch(Exception):
    """A saved state that does not fit its part; the message continues ``trainer.resume: <checkpoint> ``."""


class TrainingState:
    """Name -> stateful part, in the order they are restored."""

    def __init__(self) -> None:
        self.parts: dict[str, Any] = {}  # each with state_dict() and load_state_dict(state)
        self.when_missing: dict[str, Callable[[str], None]] = {}

    def register(self, name: str, part: Any, when_missing: Callable[[str], None] | None = None) -> None:
        """Add ``part`` under ``name``; ``when_missing(source)`` runs when a checkpoint has no state for it, or None
        (default: an info line, and the part keeps its fresh state)."""
        assert name not in self.parts, f"two stateful parts are registered as {name!r}"
        self.parts[name] = part
        if when_missing is not None:
            self.when_missing[name] = when_missing

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, saved: Mapping[str, Any], source: str) -> None:
        for name, part in self.parts.items():
            if name not in saved or (saved[name] is None and name in self.when_missing):
                self.when_missing.get(name, partial(_starts_afresh, name=name))(source)
                continue
            try:
                part.load_state_dict(saved[name])
            except Mismatch as e:
                raise CheckpointError(f"trainer.resume: {source} {e}") from None


def _starts_afresh(source: str, name: str) -> None:
    log.info("trainer.resume: %s has no state for %s; it starts afresh", source, name)


class Model:
    """The trained networks' weights and buffers."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise Mismatch(f"does not fit this model: {e}") from None


class Optimizers:
    """Each phase's optimizer, by phase name."""

    def __init__(self, phases):
        self.phases = phases

    def state_dict(self) -> dict:
        return {p.name: p.optimizer.state_dict() for p in self.phases}

    def load_state_dict(self, state: dict) -> None:
        missing = {p.name for p in self.phases} - set(state)
        if missing:
            raise Mismatch(f"has no optimizer state for phases {sorted(missing)}")
        for p in self.phases:
            try:
                p.optimizer.load_state_dict(state[p.name])
            except (ValueError, KeyError) as e:  # another optimizer type, Lookahead on/off, other groups
                raise Mismatch(
                    f"holds optimizer state for phase {p.name} that does not fit {type(p.optimizer).__name__} ({e}); "
                    "resume with the optimizer it was trained with"
                ) from None


class Each:
    """A mapping of name -> part as one state; a name the checkpoint lacks keeps its part's fresh state, and
    ``usable(part, saved)`` may decline a saved state (a loss scaler's, written at another precision)."""

    def __init__(self, parts: Mapping[str, Any], usable: Callable[[Any, Any], bool] = lambda part, s: True):
        self.parts, self.usable = parts, usable

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            if name in state and self.usable(part, state[name]):
                part.load_state_dict(state[name])


class RNGs:
    """Every RNG a training step may draw from."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
