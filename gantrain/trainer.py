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
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from gantrain import amp, checks
from gantrain.distributed import DDPSettings
from gantrain.ema import EMA
from gantrain.errors import ConfigError, NonFiniteError
from gantrain.events import Callback
from gantrain.nonfinite import NonFiniteGuard
from gantrain.optim import Schedule
from gantrain.phase import CLIP_ALGORITHMS, Phase
from gantrain.stats import Collector, collecting, report

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
NONFINITE_POLICIES = ("stop", "skip")
GRAD_NORM_LOGS = ("total", "layer")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's


@dataclass
class EMASettings:
    """``trainer.ema.*``: EMA of the generator (of the counting phase's network)."""

    half_life_images: float = 0.0  # images for the EMA weight of a sample to halve (stylegan2-ada: 10k); 0 = off


@dataclass
class TrainerSettings:
    """Every ``trainer.*`` key (the ``trainer`` config group instantiates this)."""

    max_steps: int = 1000  # optimizer steps of the phase that counts (generator steps for GANs)
    device: str = "auto"  # auto -> cuda, else mps, else cpu; or any torch device string
    n_critic: int = 1  # discriminator steps per generator step (the G phase's interval)
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed
    # Speed switches (gantrain.speed), off by default. compile: false | true (= default) | default | reduce-overhead |
    # max-autotune: torch.compile each network, not the losses; one a penalty takes input gradients through stays eager
    compile: bool | str = False
    channels_last: bool = False  # networks and 4-D image batches in channels-last memory format (GPU convolutions)
    matmul_precision: str = "highest"  # highest | high | medium: float32 matmuls in TF32/bf16 on NVIDIA GPUs
    accumulate_grad_batches: int = 1  # micro-batches summed into each optimizer step
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"  # norm | value
    log_grad_norms: str = "total"  # total: grad_norm/<phase>; layer: also grad_norm/<phase>/<parameter> (pre-clip)
    on_nonfinite: str = "stop"  # stop | skip: a NaN/inf loss term or gradient norm ends the run, or its step is dropped
    max_consecutive_skips: int = 20  # dropped steps in a row of one phase (skip, fp16 scaler) that end the run;
    # 20 fp16 skips halve the initial 2^16 loss scale below 1: the gradients overflow even unscaled
    detect_anomaly: bool = False  # autograd's anomaly mode: names the backward op that made the first NaN (slow)
    log_every_n_steps: int = 10
    log_every_n_seconds: float = 30.0  # plain progress lines (no bar): at most one per this many seconds; 0 = every log
    sample_every_n_steps: int = 200
    num_samples: int = 64  # images in each sample grid (fixed noise)
    checkpoint_every_n_steps: int = 500  # last.ckpt; also written at the end and when a signal stops the run
    keep_checkpoints: int = 0  # also keep the N newest saves as checkpoints/step_0005000.ckpt (0: only last.ckpt)
    resume: Optional[str] = None  # null | auto (this run dir's last.ckpt) | a checkpoint path
    progress_bar: bool = True  # tqdm bar on a terminal; off a terminal (or false) plain progress lines are logged
    ema: EMASettings = field(default_factory=EMASettings)
    ddp: DDPSettings = field(default_factory=DDPSettings)  # used only under torchrun/SLURM (gantrain.distributed)
    eval_every_n_steps: int = 0  # evaluation (metrics=, the 2-D mixtures' toy/*, a VAE's held-out ELBO); 0: at the end
    monitor: str = "loss/G"  # what a run returns to a sweeper: an evaluated value's best (metrics/fid), else the last
    monitor_mode: str = "auto"  # min | max | auto (max for elbo, precision, recall, toy/modes, toy/hq; else min)

    def __post_init__(self) -> None:
        if not isinstance(self.ema, EMASettings):  # a mapping from the config
            if not isinstance(self.ema, Mapping):
                checks.fail("ema", self.ema, "a node of EMA settings", "e.g. trainer.ema.half_life_images=10000")
            self.ema = EMASettings(**self.ema)
        if not isinstance(self.ddp, DDPSettings):  # a mapping from the config
            if not isinstance(self.ddp, Mapping):
                checks.fail("ddp", self.ddp, "a node of DDP settings", "e.g. trainer.ddp.broadcast_buffers=false")
            self.ddp = DDPSettings(**self.ddp)
        checks.number("ema.half_life_images", self.ema.half_life_images, ge=0, hint="0 = off")
        checks.number("log_every_n_seconds", self.log_every_n_seconds, ge=0, hint="0 = a line every log step")
        periods = ("log_every_n_steps", "sample_every_n_steps", "checkpoint_every_n_steps")
        for key in ("max_steps", "n_critic", "accumulate_grad_batches", "num_samples", *periods):
            checks.integer(key, getattr(self, key), at_least=1)
        checks.integer("keep_checkpoints", self.keep_checkpoints, at_least=0, hint="0 = only last.ckpt")
        checks.integer("eval_every_n_steps", self.eval_every_n_steps, at_least=0, hint="0 = only at the end")
        checks.choice("monitor_mode", self.monitor_mode, ("auto", "min", "max"))
        self.precision = checks.choice("precision", str(self.precision), PRECISIONS)
        checks.choice("gradient_clip_algorithm", self.gradient_clip_algorithm, CLIP_ALGORITHMS)
        checks.choice("log_grad_norms", self.log_grad_norms, GRAD_NORM_LOGS)
        checks.choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if not (isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile in COMPILE_MODES)):
            checks.fail("compile", self.compile, "one of false, true, " + ", ".join(COMPILE_MODES))  # not 1 == True
        if not isinstance(self.channels_last, bool):
            checks.fail("channels_last", self.channels_last, "true or false")
        checks.choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        checks.integer(
            "max_consecutive_skips", self.max_consecutive_skips, at_least=1, hint="skipped steps in a row that stop"
        )
        if self.gradient_clip_val is not None:
            checks.positive("gradient_clip_val", self.gradient_clip_val, hint="or null: no clipping")


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
            already yielding tensors on the training device.
        callbacks: called in list order at each event (:func:`gantrain.runlog.standard_callbacks`: resume and
            checkpoints, TensorBoard/tqdm/sample logging); ``trainer.callbacks`` may be extended later.
        world_size: processes training data-parallel (:mod:`gantrain.distributed`); ``images_seen`` counts all.
    """

    def __init__(
        self, settings: TrainerSettings, *, model: nn.Module, phases: Sequence[Phase], data, callbacks=(), world_size=1
    ):
        counting = [p.name for p in phases if p.counts_as_step]
        assert len(counting) == 1, f"exactly one phase must count as the training step, got {counting}"
        assert len({p.name for p in phases}) == len(phases), "phase names must be unique (checkpoint keys)"
        self.settings, self.model, self.phases, self.data = settings, model, list(phases), data
        self.callbacks: list[Callback] = list(callbacks)
        self.world_size = world_size  # data-parallel processes, each drawing its own batches (gantrain.distributed)
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
        self.guard = NonFiniteGuard(settings, [p.name for p in self.phases], self.device, fp16, model)
        # its per-phase counters (the same dicts): the scaler's skips, on_nonfinite=skip's, either kind in a row
        self.skipped_steps, self.nonfinite_skips = self.guard.skipped_steps, self.guard.nonfinite_skips
        self.skips_in_a_row = self.guard.skips_in_a_row
        if settings.detect_anomaly:
            log.warning("trainer.detect_anomaly=true: autograd's anomaly mode makes every step several times slower")
        self.ema: EMA | None = None
        self.ema_module_name = ""  # the EMA network's name in the model ("g")
        if settings.ema.half_life_images > 0:
            self.ema = EMA(counting_phase.module, settings.ema.half_life_images)
            self.ema_module_name = next(n for n, m in model.named_modules() if m is counting_phase.module)
        self.step = 0  # completed steps of the counting phase
        self.iteration = 0  # loop iterations (each runs the phases due)
        self.images_seen = 0  # real images drawn from the data
        self.collector = Collector()
        self.metrics: dict[str, float] = {}  # the last logged training stats
        self.eval_metrics: dict[str, float] = {}  # the evaluator's last results
        self.evaluated_step: int | None = None  # the step they are of
        self.best: dict | None = None  # trainer.monitor's best evaluation: {monitor, mode, value, step}
        self.stop_reason: str | None = None  # set by request_stop(): fit() ends after the step in flight

    def request_stop(self, reason: str) -> None:
        """End ``fit()`` after the step in flight as if it were the last (callbacks see ``on_fit_end``, so a
        checkpoint is written at that step); the first reason is kept. Safe to call from a signal handler."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def fit(self) -> dict[str, float]:
        """Train until ``max_steps`` (or a :meth:`request_stop`); returns the last logged stats and evaluator
        metrics plus ``step``."""
        try:
            self._emit("on_fit_start")
            with collecting(self.collector):
                while self.step < self.settings.max_steps:
                    stepped = False
                    for phase in self.phases:
                        if (self.iteration + 1) % phase.interval == 0:
                            self.run_phase(phase)
                            self._emit("on_phase_end", phase)
                            stepped |= phase.counts_as_step
                    self.iteration += 1
                    if stepped:
                        self.step += 1
                        if self.guard.reads_due(self.step):
                            self.read_deferred_checks()
                        self._emit("on_step_end")
                        if self.stop_reason is not None:
                            break
                self.read_deferred_checks()
            self._emit("on_fit_end")
        finally:
            self._emit("teardown")
        return {**self.metrics, **self.eval_metrics, "step": float(self.step)}

    def read_deferred_checks(self) -> None:
        """Read the non-finite checks waiting on the device (:meth:`NonFiniteGuard.read`)."""
        self.guard.read(self.step)

    def _emit(self, event: str, *args) -> None:
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
        applied = False
        try:
            k = self.settings.accumulate_grad_batches
            step = self.iteration // phase.interval  # this phase's optimizer steps so far
            images, losses = 0, []
            dtype, enabled = self.amp_dtype or torch.float32, self.amp_dtype is not None  # autocast off at 32
            phase.optimizer.zero_grad(set_to_none=True)
            # input-gradient penalties scale/unscale with this phase's scaler
            with amp.scaling(scaler) as overflows, self._anomaly_mode(phase):
                for i in range(k):
                    real = next(self.data)  # fresh real batch per micro-batch (the loss draws fresh noise)
                    # under DDP the gradients are all-reduced once, in the last micro-batch's backward
                    loss_fn = phase.loss if i == k - 1 or phase.no_sync_loss is None else phase.no_sync_loss
                    with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
                        loss = loss_fn(real, step)
                    scaler.scale(loss / k).backward()
                    losses.append(loss.detach())
                    images += real.shape[0]
            images *= self.world_size  # the images of all ranks: EMA half-life and images/s count them all
            self.images_seen += images
            scaler.unscale_(phase.optimizer)  # clip and measure true gradients, not scaled ones
            named = [(n, p) for n, p in phase.module.named_parameters() if p.grad is not None]
            grad_norm = self._grad_norm(phase, named)
            checked = (reported, losses, overflows, grad_norm, named)
            problem, finite_grads = self.guard.check(self.step + 1, phase.name, *checked)  # stop: raises
            applied = problem is None
            if applied:
                self._clip(phase, [p for _, p in named], grad_norm)
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
            self.collector.release(keep=applied)
        if applied:
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

    def _grad_norm(self, phase: Phase, named: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The pre-clip total L2 norm of the gradients; ``log_grad_norms=layer`` also reports each parameter's."""
        if not named:
            return torch.zeros((), device=self.device)
        grads = [p.grad for _, p in named]
        if self.settings.log_grad_norms == "total":
            return torch.nn.utils.get_total_norm(grads)
        norms = torch._foreach_norm(grads)  # what get_total_norm computes first, kept per parameter
        for (name, _), norm in zip(named, norms):
            report(f"grad_norm/{phase.name}/{name}", norm)
        return torch.linalg.vector_norm(torch.stack(norms))

    def _clip(self, phase: Phase, params: list[torch.Tensor], norm: torch.Tensor) -> None:
        """Clip in place per the phase's (else the trainer's) settings; ``norm``: their pre-clip total norm."""
        val = self.settings.gradient_clip_val if phase.gradient_clip_val is None else phase.gradient_clip_val
        algorithm = phase.gradient_clip_algorithm or self.settings.gradient_clip_algorithm
        if val and params and algorithm == "norm":
            torch.nn.utils.clip_grads_with_norm_(params, val, norm)  # = clip_grad_norm_, the norm computed once
        elif val and params:
            torch.nn.utils.clip_grad_value_(params, val)

    def averaged_weights(self):
        """Context: the EMA weights in the generator while sampling/evaluating (nothing without EMA)."""
        return self.ema.swapped() if self.ema is not None else nullcontext()


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
