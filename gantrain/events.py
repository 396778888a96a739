"""The events the Trainer calls: what logging, checkpoints, samples and tests attach to.

Subclass :class:`Callback`, override the events you need and pass it in ``Trainer(callbacks=[...])``;
callbacks run in list order at each event. A callback may read the trainer's public state:

* ``step`` (completed optimizer steps of the counting phase), ``iteration`` (loop iterations),
  ``images_seen`` (real images drawn from ``data``), ``settings`` (:class:`~gantrain.settings.TrainerSettings`),
  ``cadence`` (:class:`~gantrain.cadence.Cadence`: which steps log, sample, evaluate and checkpoint);
* ``model``, ``phases``, ``data``, ``device``, ``schedulers``/``scalers`` (per phase name), ``guard`` (the
  non-finite guard: ``skipped_steps``, the fp16 scaler's, and ``nonfinite_skips``, ``on_nonfinite=skip``'s, per
  phase name), ``ema`` (None when off) and ``averaged_weights()`` (a context: the EMA weights in the network);
* ``stop_reason`` (None, or why ``fit()`` ends early, e.g. ``SIGTERM``: the step of ``on_fit_end`` is then
  not ``max_steps``) and ``request_stop(reason)``;
* ``collector`` (the stats ``report``-ed since the last drain) and ``state`` (the registry a checkpoint saves).

Callbacks keep their own state and reach each other through events (``trainer.emit``), not through the trainer;
they must not change the trained state (weights, optimizers, RNGs) except to resume in ``on_fit_start``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gantrain.phase import Phase
    from gantrain.trainer import Trainer


class Callback:
    """No-op base: override any of the events (pytorch-ignite's events, Lightning's hooks, only six). A callback with
    state of its own that a resumed run needs sets ``state_key`` (its name in the checkpoint) and implements
    ``state_dict()``/``load_state_dict()``; the Trainer registers it (:mod:`gantrain.state`). ``results()``: what it
    contributes to ``fit()``'s return value (the last logged stats, evaluation values)."""

    state_key: str | None = None

    def results(self) -> dict[str, float]:
        return {}

    def on_evaluation(self, trainer: Trainer, values: dict[str, float], best: dict | None) -> None:
        """An evaluation ran at ``trainer.step`` (:class:`gantrain.metrics.loop.Evaluation`): ``values``, and ``best``
        so far, ``{monitor, mode, value, step}`` or None."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """``fit()`` begins (resume restores the state here, before anything is logged)."""

    def on_phase_end(self, trainer: Trainer, phase: Phase) -> None:
        """A phase took its optimizer step (and LR-scheduler/EMA update); in run order: D, ..., D, G."""

    def on_step_end(self, trainer: Trainer) -> None:
        """The counting phase completed step ``trainer.step`` (1, 2, ..., ``max_steps``)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """The loop reached ``max_steps`` or stopped on request (``trainer.stop_reason``); not called when it raised."""

    def teardown(self, trainer: Trainer) -> None:
        """Last, also after an exception: close files and progress bars."""
