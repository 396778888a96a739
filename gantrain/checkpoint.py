"""Checkpoint files: atomic writes, RNG capture/restore, and clear errors on mismatches."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gantrain.errors import GantrainError
from gantrain.files import atomic_write

FORMAT = "gantrain-checkpoint/1"


class CheckpointError(GantrainError):
    """A checkpoint that cannot be used for what was asked (missing, corrupt, or from another model)."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` via :func:`gantrain.files.atomic_write`: a crash or a full disk mid-write
    leaves any existing ``path`` untouched."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str | Path, what: str = "trainer.resume") -> dict[str, Any]:
    """Load a gantrain checkpoint on CPU, or raise :class:`CheckpointError` naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: checkpoint '{path}' does not exist")
    try:
        # Our checkpoints hold numpy/python RNG states, so the weights-only unpickler is too strict.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated/corrupt file, or not a torch file at all
        raise CheckpointError(
            f"{what}: '{path}' is not a readable checkpoint (truncated, corrupt, or not written by torch.save; "
            f"{type(e).__name__}: {e})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{what}: '{path}' is not a gantrain checkpoint (expected format {FORMAT!r})")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def flatten_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten_dict(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as ``key: saved -> current``."""
    a, b = flatten_dict(saved), flatten_dict(current)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
