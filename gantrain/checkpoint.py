"""Checkpoints: the trainer's state, resume and periodic saves (:class:`Checkpointing`), atomic writes,
clear errors on mismatches. A resumed run continues bit-identically: the state holds every part registered in
``trainer.state`` (:mod:`gantrain.state`: the model, every optimizer, scheduler and scaler, the EMA, the data
stream's position, every RNG, the objective's and the callbacks' own state); this module only adds the run's
config and settings, and never needs to know a part.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import asdict
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object

from gantrain.errors import CheckpointError, NonFiniteError
from gantrain.events import Callback
from gantrain.files import atomic_write, remove_stale_temporaries
from gantrain.optim import HORIZON_KINDS
from gantrain.stats import first_nonfinite

log = logging.getLogger(__name__)

FORMAT = "gantrain-checkpoint/1"


__all__ = ["CheckpointError", "Checkpointing", "load", "save_atomic", "trainer_state"]
# Checkpoints written before the guard saved its own state (gantrain.state) kept its counters at the top level.
GUARD_KEYS = ("skipped_steps", "nonfinite_skips", "skips_in_a_row")


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
    if "guard" not in ckpt and any(k in ckpt for k in GUARD_KEYS):  # written before gantrain.state
        ckpt["guard"] = {k: ckpt.pop(k) for k in GUARD_KEYS if k in ckpt}
    return ckpt


def flatten_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten_dict(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_differences(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as ``key: saved -> current``.

    A key only one side has is a setting of another gantrain version (a new optional argument, a
    removed one) and is not a difference; two ``_target_`` paths naming the same object are equal
    (``gantrain.models.GAN`` is ``gantrain.models.generative.GenerativeModel``), so checkpoints of
    older versions still resume. Keys matching an ``ignore`` pattern (fnmatch) are skipped.
    """
    a, b = flatten_dict(saved), flatten_dict(current)
    return [
        f"{k}: {a[k]!r} -> {b[k]!r}"
        for k in sorted(a.keys() & b.keys())
        if a[k] != b[k]
        and not (k.endswith("_target_") and _same_object(a[k], b[k]))
        and not any(fnmatch(k, pattern) for pattern in ignore)
    ]


def _same_object(a: Any, b: Any) -> bool:
    try:
        return get_object(a) is get_object(b)
    except Exception:  # not importable here: compare the paths only
        return False


def trainer_state(trainer) -> dict[str, Any]:
    """Everything a bit-exact resume of ``trainer`` needs (:class:`Checkpointing` adds the config)."""
    return {"format": FORMAT, **trainer.state_dict()}


# What a resumed run may change: how long it runs, where, and how it is watched and saved, not what it
# computes. Everything else (model, loss, optim, data, batch size, n_critic, precision, seed, ...) is
# another run: resuming with it changed is refused, so the config a run records is the one that ran.
MAY_CHANGE_ON_RESUME = (
    "experiment_name",
    "trainer.max_steps",
    "trainer.device",
    "trainer.resume",
    "trainer.progress_bar",
    "trainer.log_*",
    "trainer.sample_every_n_steps",
    "trainer.num_samples",
    "trainer.checkpoint_every_n_steps",
    "trainer.keep_checkpoints",
    "trainer.monitor",
    "trainer.monitor_mode",
    "trainer.eval_every_n_steps",
    "metrics.cache_dir",  # where reference features are cached, and how many images go through at once
    "metrics.batch_size",
    "trainer.on_nonfinite",
    "trainer.max_consecutive_skips",
    "trainer.detect_anomaly",
    # how the same float32 arithmetic runs (kernels, fusion, memory layout: rounding may differ, as on another
    # trainer.device); trainer.matmul_precision is not here: TF32/bf16 matmuls are less exact arithmetic, as precision
    "trainer.compile",
    "trainer.channels_last",
    "data.root",  # where a downloadable dataset is cached, not which one
    "data.download",
    "data.num_workers",  # how batches are loaded, not which (the stream's order does not depend on them)
    "data.in_memory",
    "data.skip_corrupt",  # the documented way to continue past a corrupt image
)


def check_same_run(state: dict[str, Any], config: dict, source: str) -> None:
    """Refuse to resume ``state`` under a ``config`` that makes it another run (see ``MAY_CHANGE_ON_RESUME``)."""
    saved = state.get("config") or state.get("compat", {})  # tests' hand-made states hold only compat
    diffs = config_differences(saved, config, ignore=MAY_CHANGE_ON_RESUME)
    if diffs:
        shown = diffs[:20] + ([f"... and {len(diffs) - 20} more"] if len(diffs) > 20 else [])
        raise CheckpointError(
            f"trainer.resume: {source} was written by another run; these settings differ (checkpoint -> now):\n  "
            + "\n  ".join(shown)
            + "\nA resumed run keeps its settings (it may change only trainer.max_steps, trainer.device, logging "
            "and checkpointing); resume without these overrides, or start a new run in another hydra.run.dir."
        )


def check_world_size(saved: int, now: int, source: Path) -> None:
    """A checkpoint resumes only with the number of processes that wrote it: each rank's data shard and noise
    depend on it (:mod:`gantrain.distributed`), so another count would be another run."""
    if saved != now:
        launch = lambda n: "one process (python -m gantrain)" if n == 1 else f"{n} (torchrun --nproc_per_node={n})"
        raise CheckpointError(
            f"trainer.resume: checkpoint '{source}' was written by {launch(saved)} but this run has {launch(now)}; "
            "resume with the same number of processes (data shards and noise depend on it)"
        )


def load_trainer_state(trainer, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Restore :func:`trainer_state` into ``trainer``; refuse a checkpoint whose weights/optimizers do not fit."""
    trainer.load_state_dict(state, source)
    saved, now = state.get("settings", {}).get("max_steps", trainer.settings.max_steps), trainer.settings.max_steps
    # only a schedule that ends at its horizon (cosine, linear) runs differently; constant, step and exponential do not
    ending = [p.name for p in trainer.phases if p.schedule is not None and p.schedule.kind in HORIZON_KINDS]
    if saved != now and ending:
        msg = "trainer.resume: trainer.max_steps changed from %d to %d; the LR schedules of %s keep the checkpoint's "
        log.warning(msg + "horizon (%d steps)", saved, now, "/".join(ending), saved)


class Checkpointing(Callback):
    """Resumes in ``on_fit_start``; writes ``run_dir/checkpoints/last.ckpt`` every ``checkpoint_every_n_steps``,
    at the end and when the run is stopped early (rank 0 only; every rank resumes), and keeps the ``keep``
    newest of those as ``step_0005000.ckpt`` snapshots beside it.

    Every refusal happens here, when it is built, before anything is written: a ``run_dir`` that already
    holds a checkpoint unless ``resume`` (None, ``auto``: this run dir's checkpoint if any, or a path) is
    set; a checkpoint that is missing, corrupt or from another run (:func:`check_same_run` against
    ``config``, the resolved config that is also saved in each checkpoint).
    """

    def __init__(self, run_dir, resume=None, config=None, is_main=True, keep: int = 0, world_size: int = 1):
        self.folder = Path(run_dir) / "checkpoints"
        self.path = self.folder / "last.ckpt"
        for path in (self.folder, self.path, self.folder / "best.ckpt"):  # where this run writes, checked first
            if path.exists() and path.is_dir() != (path == self.folder):
                what = (
                    "a file; gantrain keeps its checkpoints in a folder"
                    if path == self.folder
                    else "a folder; gantrain writes its checkpoint file"
                )
                raise CheckpointError(
                    f"'{path}' is {what} there; move it away, or start a new run in another hydra.run.dir"
                )
        if resume is None and self.path.exists():
            raise CheckpointError(
                f"run directory '{run_dir}' already holds a checkpoint ({self.path}); continue it with "
                "trainer.resume=auto, or start a new run in another hydra.run.dir"
            )
        self.config, self.is_main, self.keep, self.world_size = config or {}, is_main, keep, world_size
        self.source: Path | None = None  # the checkpoint to resume from, loaded now to check it
        self.state: dict[str, Any] | None = None
        if resume == "auto" and not self.path.is_file():
            log.info("trainer.resume=auto: no checkpoint at %s, starting from scratch", self.path)
        elif resume is not None:
            self.source = self.path if resume == "auto" else Path(resume)
            self.state = load(self.source)
            check_same_run(self.state, self.config, source=f"checkpoint '{self.source}'")
            check_world_size(self.state.get("world_size", 1), world_size, self.source)
        self.start_step = 0 if self.state is None else self.state["step"]
        self.saved_metrics = {} if self.state is None else dict(self.state.get("metrics", {}))
        if self.state is not None and self.state.get("best"):  # the step of the best value too (a sweep's table)
            best = self.state["best"]
            self.saved_metrics[f"best/{best['monitor']}/step"] = float(best["step"])

    def on_fit_start(self, trainer) -> None:
        if self.is_main:
            remove_stale_temporaries(self.folder)  # of a save that was killed (the run dir is locked by now)
        if self.state is not None:
            load_trainer_state(trainer, self.state, source=f"checkpoint '{self.source}'")
            self.state = None  # the tensors now live in the trainer
            log.info("resumed from %s at step %d", self.source, trainer.step)
        if trainer.step >= (max_steps := trainer.settings.max_steps):
            log.info("checkpoint is already at step %d >= trainer.max_steps=%d; nothing to do", trainer.step, max_steps)

    def on_step_end(self, trainer) -> None:
        if trainer.cadence.checkpoints(trainer.step) and trainer.step < trainer.settings.max_steps:
            if trainer.stop_reason is None:  # else on_fit_end writes it right away
                self.save(trainer)  # the final one is written by on_fit_end

    def on_fit_end(self, trainer) -> None:
        if trainer.step != self.start_step:  # nothing to add to the checkpoint it resumed from
            self.save(trainer)

    def save(self, trainer) -> None:
        """Write ``trainer``'s state with the config to last.ckpt (rank 0 only), then the step snapshot if ``keep``."""
        if not self.is_main:
            return
        self.write(trainer, self.path)
        if self.keep:
            snapshot = self.folder / f"step_{trainer.step:07d}.ckpt"
            _link_or_copy(self.path, snapshot)
            for old in self.snapshots()[: -self.keep]:
                old.unlink(missing_ok=True)

    def write(self, trainer, path: Path) -> None:
        """``trainer``'s state with the config, atomically to ``path`` (last.ckpt, best.ckpt); never weights or
        buffers with a NaN/inf (the file there, if any, stays as it was)."""
        state = {**trainer_state(trainer), "config": self.config, "settings": asdict(trainer.settings)}
        state["world_size"] = self.world_size
        tensors = {f"model {k}": v for k, v in state["model"].items()}
        tensors.update({f"EMA {k}": v for k, v in (state.get("ema") or {}).get("average", {}).items()})
        bad = first_nonfinite(tensors)
        if bad is not None:  # a checkpoint that resumes into NaNs is worse than the previous one
            raise NonFiniteError(
                f"step {trainer.step}: {bad} holds NaN/inf, so {path} was not written (the one there, if "
                "any, is unchanged); lower the learning rate (optim.<net>.lr) or clip gradients "
                "(trainer.gradient_clip_val)"
            )
        save_atomic(state, path)

    def snapshots(self) -> list[Path]:
        """The ``step_*.ckpt`` files, oldest step first."""
        found = [p for p in self.folder.glob("step_*.ckpt") if re.fullmatch(r"step_\d+\.ckpt", p.name)]
        return sorted(found, key=lambda p: int(p.stem[5:]))


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s bytes: a hard link (no second write; the next atomic save of ``src`` replaces
    its name, not the linked file), else an atomic copy (file systems without hard links)."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.tmp")  # removed at the next start if we die here
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(dst, lambda f: f.write(src.read_bytes()))
