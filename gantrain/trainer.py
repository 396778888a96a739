"""The one training loop: phases in, trained networks out.

A :class:`Phase` is (name, module, optimizer, loss callable, interval). Each iteration runs every
phase whose interval divides it; the phase marked ``counts_as_step`` defines a training step
(the generator for GANs). The Trainer owns the gradient hygiene every phase shares:

* only the active phase's module has ``requires_grad=True``; every other parameter of the model is
  frozen while it runs and the flags are restored afterwards, so a G step cannot touch D's grads;
* ``zero_grad(set_to_none=True)`` once before each accumulation window, each micro-batch (fresh
  data, fresh noise) and every term of its loss divided by the window size, then unscaling,
  clipping, one optimizer step and one LR-scheduler step;
* autocast and the per-phase loss scalers are contexts/objects that do nothing at ``precision=32``
  (no ``if amp:`` branches); under ``16-mixed`` each phase has its own ``GradScaler``, so a D step
  that overflows backs off D's scale only (D and G losses differ by orders of magnitude, e.g. a
  critic with a gradient penalty), and steps skipped for inf/NaN are counted per phase;
* an optional EMA of the counting phase's network (the generator) replaces its weights while
  sample grids and evaluation run;
* every optimizer step is checked for a NaN or an infinity in a loss term the loss reported
  (``loss/...``), in the loss it returned or in the gradient norm. On the CPU, and wherever the
  answer is needed before the update (``on_nonfinite=skip``, the fp16 scaler's streaks), the check
  reads the values before the step is applied: one read per optimizer step, which on the CPU waits
  for nothing. Such a value stops the run with one line (``on_nonfinite=stop``) or discards the step
  (``skip``: no optimizer, EMA or ``after_step`` update, the values it reported not logged; the LR
  scheduler still steps, as it does for the fp16 scaler's skips, so the schedule follows the step
  count). ``max_consecutive_skips`` skipped steps in a row of one phase, ours or the fp16 scaler's,
  stop the run the same way.
* on an accelerator under ``stop`` (fp32, bf16) a read would make the host wait for the device at every
  step, so the values wait on the device (``check_every_step`` False in :mod:`gantrain.nonfinite`) and
  are read with one sync at the next logging, sample or checkpoint step (at least every ``DEFERRED_CHECKS`` phase steps)
  and before the run ends: the run stops there, naming the first bad step, phase and term, with the
  updates since applied and no checkpoint written, so the guard of :mod:`gantrain.checkpoint` and
  ``last.ckpt`` of before stay as under the CPU's exact stop.

Logging, sample grids and checkpoints are callbacks (:mod:`gantrain.events`): :mod:`gantrain.runlog`
and :mod:`gantrain.checkpoint`, built by :func:`gantrain.runlog.standard_callbacks`. Losses and models never see a
writer, a config or a device string.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from gantrain import amp
from gantrain.cadence import Cadence
from gantrain.ema import EMA
from gantrain.errors import ConfigError, NonFiniteError
from gantrain.events import Callback
from gantrain.nonfinite import NonFiniteGuard
from gantrain.optim import Schedule
from gantrain.phase import Phase
from gantrain.settings import EMASettings, TrainerSettings  # noqa: F401 - their home before gantrain.settings
from gantrain.state import Each, Model, Optimizers, RNGs, TrainingState
from gantrain.stats import Collector, collecting, report

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # trainer.precision -> autocast


def resolve_device(spec: str, key: str = "trainer.device") -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; anything else must name an available torch device."""
    if spec == "auto":
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec!r} but CUDA is not available here; use {key}=auto or cpu")
    return device


class Trainer:
    """Runs the phase loop; logging, samples and checkpoints attach as :mod:`gantrain.events` callbacks.

    Args:
        settings: the ``trainer.*`` values.
        model: the container of every trained network (checkpointed whole; its parameters outside
            the active phase's module are frozen while that phase runs).
        phases: from the objective, in the order they run within an iteration.
        data: an endless batch iterator with ``state_dict``/``load_state_dict`` (``BatchStream``),
            already yielding :class:`~gantrain.batch.Batch` objects on the training device.
        callbacks: called in list order at each event (:func:`gantrain.runlog.standard_callbacks`: resume and
            checkpoints, TensorBoard/tqdm/sample logging); ``trainer.callbacks`` may be extended later.
        world_size: processes training data-parallel (:mod:`gantrain.distributed`); ``images_seen`` counts all.
    """

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        model: nn.Module,
        phases: Sequence[Phase],
        data,
        callbacks=(),
        world_size=1,
        state: Mapping[str, Any] | None = None,
    ):
        counting = [p.name for p in phases if p.counts_as_step]
        assert len(counting) == 1, f"exactly one phase must count as the training step, got {counting}"
        assert len({p.name for p in phases}) == len(phases), "phase names must be unique (checkpoint keys)"
        self.settings, self.model, self.phases, self.data = settings, model, list(phases), data
        self.callbacks: list[Callback] = list(callbacks)
        self.world_size = world_size  # data-parallel processes, each drawing its own batches (gantrain.distributed)
        self.cadence = Cadence.of(settings, self.phases)  # which phases run when, and when callbacks write
        self.params = list(model.parameters())
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.amp_dtype = PRECISIONS[settings.precision]
        counting_phase = next(p for p in self.phases if p.counts_as_step)
        iterations = settings.max_steps * counting_phase.interval  # of the whole run
        # One LR scheduler per phase, its horizon the optimizer steps that phase takes in the run.
        self.schedulers = {
            p.name: (p.schedule or Schedule()).build(p.optimizer, total_steps=max(iterations // p.interval, 1))
            for p in self.phases
        }
        fp16 = settings.precision == "16-mixed"
        if fp16 and self.device.type == "cpu":
            log.warning("trainer.precision=16-mixed on CPU is slow and for testing; CPUs train with bf16-mixed")
        self.scalers = {p.name: torch.amp.GradScaler(self.device.type, enabled=fp16) for p in self.phases}
        phase_names = [p.name for p in self.phases]
        self.guard = NonFiniteGuard(settings.nonfinite, phase_names, self.device, fp16, model, self.cadence)
        if settings.detect_anomaly:
            log.warning("trainer.detect_anomaly=true: autograd's anomaly mode makes every step several times slower")
        self.ema: EMA | None = None
        if settings.ema.half_life_images > 0:
            name = next(n for n, m in model.named_modules() if m is counting_phase.module)  # "g"
            self.ema = EMA(counting_phase.module, settings.ema.half_life_images, name)
        self.step = 0  # completed steps of the counting phase
        self.iteration = 0  # loop iterations (each runs the phases due)
        self.images_seen = 0  # real images drawn from the data
        self.collector = Collector()
        self.stop_reason: str | None = None  # set by request_stop(): fit() ends after the step in flight
        # Everything a checkpoint holds, restored in this order (gantrain.state); the checkpoint adds the counters.
        scalers = Each(self.scalers, usable=lambda scaler, saved: scaler.is_enabled() and saved)
        own = [("model", Model(model)), ("optimizers", Optimizers(self.phases)), ("schedulers", Each(self.schedulers))]
        own += [("scalers", scalers), ("guard", self.guard), ("ema", self.ema), ("data", data), ("rng", RNGs())]
        declared = [(c.state_key, c) for c in self.callbacks if c.state_key is not None]  # best, logged values
        self.state = TrainingState()
        for name, part in [*own, *(state or {}).items(), *declared]:  # the objective's stateful terms between
            if part is not None:
                self.state.register(name, part, when_missing=self.ema.restart if name == "ema" else None)

    def state_dict(self) -> dict:
        """The step counters and every registered part's state: what a bit-exact resume needs."""
        counters = {"step": self.step, "iteration": self.iteration, "images_seen": self.images_seen}
        return {**counters, **self.state.state_dict()}

    def load_state_dict(self, state: Mapping, source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict`'s snapshot; a part it does not fit raises a one-line CheckpointError."""
        self.state.load_state_dict(state, source)
        self.step, self.iteration, self.images_seen = state["step"], state["iteration"], state["images_seen"]

    def request_stop(self, reason: str) -> None:
        """End ``fit()`` after the step in flight as if it were the last (callbacks see ``on_fit_end``, so a
        checkpoint is written at that step); the first reason is kept. Safe to call from a signal handler."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def fit(self) -> dict[str, float]:
        """Train until ``max_steps`` (or a :meth:`request_stop`); returns the callbacks' results (the last logged
        stats and evaluation values) plus ``step``."""
        phases = {p.name: p for p in self.phases}
        try:
            self.emit("on_fit_start")
            with collecting(self.collector):
                while self.step < self.settings.max_steps:
                    due = self.cadence.due(self.iteration)
                    for name in due:
                        self.run_phase(phases[name])
                        self.emit("on_phase_end", phases[name])
                    self.iteration += 1
                    if self.cadence.counting in due:
                        self.step += 1
                        if self.guard.reads_due(self.step):
                            self.read_deferred_checks()
                        self.emit("on_step_end")
                        if self.stop_reason is not None:
                            break
                self.read_deferred_checks()
            self.emit("on_fit_end")
        finally:
            self.emit("teardown")
        return {**{k: v for c in self.callbacks for k, v in c.results().items()}, "step": float(self.step)}

    def read_deferred_checks(self) -> None:
        """Read the non-finite checks waiting on the device (:meth:`NonFiniteGuard.read`)."""
        self.guard.read(self.step)

    def emit(self, event: str, *args) -> None:
        """Call ``event`` on every callback in list order (a callback may emit its own, e.g. ``on_evaluation``)."""
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def run_phase(self, phase: Phase) -> None:
        """One optimizer step of ``phase`` with the hygiene above (what ``fit()`` runs when it is due)."""
        flags = [p.requires_grad for p in self.params]
        active = {id(p) for p in phase.module.parameters()}
        for p in self.params:
            p.requires_grad_(id(p) in active)
        scaler = self.scalers[phase.name]
        lr = phase.optimizer.param_groups[0]["lr"]  # the LR this step uses
        reported = self.collector.hold()  # this step's stats are logged only if the step is applied
        applied = logged = False
        try:
            k = self.settings.accumulate_grad_batches
            step = self.iteration // phase.interval  # this phase's optimizer steps so far
            images, losses = 0, []
            dtype, enabled = self.amp_dtype or torch.float32, self.amp_dtype is not None  # autocast off at 32
            phase.optimizer.zero_grad(set_to_none=True)
            # input-gradient penalties scale/unscale with this phase's scaler
            with amp.scaling(scaler) as overflows, self._anomaly_mode(phase):
                for i in range(k):
                    batch = next(self.data)  # fresh real batch per micro-batch (the loss draws fresh noise)
                    # under DDP the gradients are all-reduced once, in the last micro-batch's backward
                    loss_fn = phase.loss if i == k - 1 or phase.no_sync_loss is None else phase.no_sync_loss
                    with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
                        loss = loss_fn(batch, step)
                    scaler.scale(loss / k).backward()
                    losses.append(loss.detach())
                    images += len(batch)
            images *= self.world_size  # the images of all ranks: EMA half-life and images/s count them all
            self.images_seen += images
            scaler.unscale_(phase.optimizer)  # clip and measure true gradients, not scaled ones
            named = [(n, p) for n, p in phase.module.named_parameters() if p.grad is not None]
            grad_norm = total_grad_norm(phase.name, named, self.settings.log_grad_norms == "layer", self.device)
            checked = (reported, losses, overflows, grad_norm, named)
            problem, finite_grads = self.guard.check(self.step + 1, phase.name, *checked)  # stop: raises
            applied = problem is None
            logged = applied and (finite_grads or not scaler.is_enabled())  # not what the fp16 scaler skips
            if applied:
                val = self.settings.gradient_clip_val if phase.gradient_clip_val is None else phase.gradient_clip_val
                clip(
                    [p for _, p in named],
                    grad_norm,
                    val,
                    phase.gradient_clip_algorithm or self.settings.gradient_clip_algorithm,
                )
                scaler.step(phase.optimizer)  # skipped when the unscaled gradients hold inf/NaN (fp16)
            else:
                phase.optimizer.zero_grad(set_to_none=True)
            scaler.update()
            with warnings.catch_warnings():  # fp16: the scaler may skip the very first optimizer step, by design
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.schedulers[phase.name].step()
            if applied and phase.after_step is not None:
                with torch.no_grad():
                    phase.after_step()
            if applied and phase.counts_as_step and self.ema is not None:
                self.ema.update(images)
        finally:
            for p, flag in zip(self.params, flags):
                p.requires_grad_(flag)
            self.collector.release(keep=logged)
        if logged:
            report(f"grad_norm/{phase.name}", grad_norm)  # before clipping
        report(f"lr/{phase.name}", lr)
        if not applied:
            self.guard.skipped(self.step + 1, phase.name, problem)
        elif scaler.is_enabled() and not finite_grads:  # the scaler's test: it did not step
            self.guard.scaler_skipped(self.step + 1, phase.name, scaler.get_scale())
        else:
            self.guard.applied(phase.name)

    def _anomaly_mode(self, phase: Phase):
        """Context: autograd's anomaly mode when ``detect_anomaly`` (else nothing); its error becomes one line."""
        if not self.settings.detect_anomaly:
            return nullcontext()
        return _AnomalyMode(f"step {self.step + 1}, phase {phase.name}")

    def averaged_weights(self):
        """Context: the EMA weights in the generator while sampling/evaluating (nothing without EMA)."""
        return self.ema.swapped() if self.ema is not None else nullcontext()


def total_grad_norm(phase: str, named: list[tuple[str, torch.Tensor]], per_layer: bool, device) -> torch.Tensor:
    """The pre-clip total L2 norm of the gradients; ``per_layer`` (``log_grad_norms=layer``) also reports each one's."""
    if not named:
        return torch.zeros((), device=device)
    grads = [p.grad for _, p in named]
    if not per_layer:
        return torch.nn.utils.get_total_norm(grads)
    norms = torch._foreach_norm(grads)  # what get_total_norm computes first, kept per parameter
    for (name, _), norm in zip(named, norms):
        report(f"grad_norm/{phase}/{name}", norm)
    return torch.linalg.vector_norm(torch.stack(norms))


def clip(params: list[torch.Tensor], norm: torch.Tensor, val: float | None, algorithm: str) -> None:
    """Clip in place to ``val`` (None or 0: not at all) by ``algorithm``; ``norm``: their pre-clip total norm."""
    if val and params and algorithm == "norm":
        torch.nn.utils.clip_grads_with_norm_(params, val, norm)  # = clip_grad_norm_, the norm computed once
    elif val and params:
        torch.nn.utils.clip_grad_value_(params, val)


class _AnomalyMode:
    """``torch.autograd.detect_anomaly()`` whose NaN error becomes a :class:`NonFiniteError` naming ``where``
    (autograd prints the forward call that made the op above it, as a warning)."""

    def __init__(self, where: str):
        self.where = where
        with warnings.catch_warnings():  # the Trainer warned once that this mode is slow
            warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
            self.mode = torch.autograd.detect_anomaly()

    def __enter__(self) -> None:
        self.mode.__enter__()

    def __exit__(self, kind, error, tb) -> None:
        self.mode.__exit__(kind, error, tb)
        if isinstance(error, RuntimeError) and "returned nan values" in str(error):
            raise NonFiniteError(f"{self.where}: trainer.detect_anomaly: {error}") from None
