"""In-loop evaluation: every ``trainer.eval_every_n_steps`` (and at the end of the run) the evaluators run
with the EMA weights swapped in; ``trainer.monitor`` among their results keeps ``checkpoints/best.ckpt``.

The best value, its step and ``trainer.monitor_mode`` are saved in every checkpoint as ``best`` (see
:class:`Evaluation`). best.ckpt is written like last.ckpt (:meth:`gantrain.checkpoint.Checkpointing.write`). How
FID/KID/PR are scored (:attr:`gantrain.metrics.Metrics.protocol`) is saved as ``metrics_protocol``
(:class:`ScoringProtocol`) and with the best.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from gantrain import checks
from gantrain.events import Callback
from gantrain.metrics.suite import describe
from gantrain.settings import EvaluationSettings

log = logging.getLogger(__name__)

MODES = ("auto", "min", "max")
# Metrics where higher is better (the last part of the name); the rest (fid, intra_fid, kid, losses) is minimised.
MAXIMIZED = ("elbo", "precision", "recall", "class_accuracy", "modes", "hq")
# Where evaluated values are named (metrics/fid, toy/modes); every other name is a training stat (loss/G, lr/G).
EVALUATED = ("metrics/", "toy/")


def check_monitor(monitor: str, tags: list[str]) -> str:
    """``trainer.monitor``, refused before training when it names an evaluated value that no evaluator of this run
    reports (``tags``); a training stat (``loss/G``) is known only once logged, so any other name passes."""
    if monitor.startswith(EVALUATED) and monitor not in tags:
        from gantrain.metrics.suite import TAGS

        fid = ", ".join(t for w in TAGS.values() for t in w)
        stat = "a training stat such as loss/G"
        must = f"one of {', '.join(tags)} (what this run evaluates), or {stat}" if tags else stat
        nothing = f"this run evaluates nothing; metrics=fid evaluates {fid}, a VAE with data.holdout > 0 metrics/elbo"
        checks.fail("trainer.monitor", monitor, must, "" if tags else nothing)
    return monitor


def direction(monitor: str, mode: str = "auto") -> str:
    """``min`` or ``max`` for ``monitor``: ``mode`` itself, or by name when ``auto``."""
    if mode != "auto":
        return mode
    return "max" if monitor.rsplit("/", 1)[-1] in MAXIMIZED else "min"


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` is better than ``best`` (None: none yet); a NaN never is."""
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


class Evaluation(Callback):
    """Runs ``evaluator`` (-> ``{name: value}``) every ``settings.every`` steps (0: only at the end) and once at the
    end (unless that step was just evaluated, or the run stops on a signal), and emits ``on_evaluation``.

    When ``settings.monitor`` is among the results it keeps the best value (``best``: ``{"monitor", "mode",
    "value", "step"}``, its checkpointed state), reports it as ``best/<monitor>`` (what a sweeper gets) and
    writes ``best.ckpt`` through ``write_best`` (a ``(trainer) -> None``). ``start_step``: the step the run
    resumes from (``() -> int``), which is not evaluated again. ``evaluator.protocol``, when it has one (how its
    FID/KID/PR are scored, :attr:`gantrain.metrics.Metrics.protocol`), is kept with the best: a best scored under
    another protocol does not compare, and a resumed run starts it afresh.
    """

    state_key = "best"

    def __init__(
        self,
        evaluator: Callable[[], dict[str, float]],
        settings: EvaluationSettings,
        write_best: Callable | None = None,
        start_step: Callable[[], int] = lambda: 0,
        is_main: bool = True,
    ):
        self.evaluator, self.every, self.monitor = evaluator, settings.every, settings.monitor
        self.mode = direction(settings.monitor, settings.mode)
        self.write_best, self.start_step, self.is_main = write_best, start_step, is_main
        self.protocol = getattr(evaluator, "protocol", None)
        self.best: dict | None = None
        self.values: dict[str, float] = {}  # the last evaluation's
        self.evaluated_step: int | None = None  # the step they are of

    def state_dict(self) -> dict | None:
        return self.best

    def load_state_dict(self, best: dict | None) -> None:
        if best and (best.get("monitor"), best.get("mode")) != (self.monitor, self.mode):
            log.warning(
                "trainer.monitor: the checkpoint kept the best %s (%s); now %s (%s): the best starts afresh",
                best.get("monitor"), best.get("mode"), self.monitor, self.mode,
            )  # fmt: skip
            best = None
        elif best and best.get("protocol", self.protocol) != self.protocol:  # a best saved before protocols: kept
            log.warning(
                "trainer.monitor: the checkpoint's best %s=%.6g (step %d) was scored under another metrics protocol "
                "(%s; now %s): the best starts afresh",
                best["monitor"], best["value"], best["step"], describe(best["protocol"]), describe(self.protocol),
            )  # fmt: skip
            best = None
        self.best = best

    def results(self) -> dict[str, float]:
        best_step = {f"best/{self.monitor}/step": float(self.best["step"])} if self.best else {}
        return {**self.values, **best_step}  # the step too, for a sweep's table (gantrain.sweep)

    def on_fit_start(self, trainer) -> None:
        self._first = self.start_step()

    def on_step_end(self, trainer) -> None:
        if trainer.cadence.evaluates(trainer.step):
            self.evaluate(trainer)

    def on_fit_end(self, trainer) -> None:
        done = self.evaluated_step == trainer.step or trainer.step == self._first
        if not done and trainer.stop_reason is None:
            self.evaluate(trainer)

    def evaluate(self, trainer) -> None:
        """Evaluate now; a better monitored value writes best.ckpt."""
        if not self.is_main:
            return
        with torch.no_grad(), trainer.averaged_weights():
            values = {k: float(v) for k, v in self.evaluator().items()}
        self.evaluated_step = trainer.step
        if self.monitor in values and improves(values[self.monitor], self.best and self.best["value"], self.mode):
            self.best = {"monitor": self.monitor, "mode": self.mode, "value": values[self.monitor]}
            self.best["step"] = trainer.step
            if self.protocol is not None:
                self.best["protocol"] = self.protocol
            if self.write_best is not None:
                self.write_best(trainer)
        if self.best:
            values[f"best/{self.monitor}"] = self.best["value"]
        self.values = values
        trainer.emit("on_evaluation", values, self.best)


class ScoringProtocol(Callback):
    """Keeps ``protocol`` (:attr:`gantrain.metrics.Metrics.protocol`: reference, count, size, extractor and its weights'
    hash) in every checkpoint as ``metrics_protocol``; a run resumed from a checkpoint scored under another protocol
    (another weights file, other reference images) says so in one warning: its scores before and after do not
    compare."""

    state_key = "metrics_protocol"

    def __init__(self, protocol: dict, is_main: bool = True):
        self.protocol, self.is_main = protocol, is_main

    def state_dict(self) -> dict:
        return self.protocol

    def load_state_dict(self, saved: dict) -> None:
        if saved != self.protocol and self.is_main:
            differ = ", ".join(k for k in sorted({*saved, *self.protocol}) if saved.get(k) != self.protocol.get(k))
            log.warning(
                "metrics: the checkpoint was scored under another protocol (%s differ): %s; now %s: its scores and "
                "these do not compare",
                differ, describe(saved), describe(self.protocol),
            )  # fmt: skip
