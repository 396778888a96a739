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
  sample grids and evaluation run.

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
from gantrain.ema import EMA
from gantrain.errors import ConfigError
from gantrain.events import Callback
from gantrain.optim import Schedule
from gantrain.phase import CLIP_ALGORITHMS, Phase
from gantrain.stats import Collector, collecting, report

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


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
    accumulate_grad_batches: int = 1  # micro-batches summed into each optimizer step
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"  # norm | value
    log_every_n_steps: int = 10
    sample_every_n_steps: int = 200
    num_samples: int = 64  # images in each sample grid (fixed noise)
    checkpoint_every_n_steps: int = 500
    resume: Optional[str] = None  # null | auto (this run dir's last.ckpt) | a checkpoint path
    progress_bar: bool = True  # tqdm bar; it also stays quiet when stdout is not a terminal
    ema: EMASettings = field(default_factory=EMASettings)
    monitor: str = "loss/G"  # the logged value a run returns to a sweeper (VAE recipes: elbo)

    def __post_init__(self) -> None:
        if not isinstance(self.ema, EMASettings):  # a mapping from the config
            if not isinstance(self.ema, Mapping):
                checks.fail("ema", self.ema, "a node of EMA settings", "e.g. trainer.ema.half_life_images=10000")
            self.ema = EMASettings(**self.ema)
        checks.number("ema.half_life_images", self.ema.half_life_images, ge=0, hint="0 = off")
        periods = ("log_every_n_steps", "sample_every_n_steps", "checkpoint_every_n_steps")
        for key in ("max_steps", "n_critic", "accumulate_grad_batches", "num_samples", *periods):
            checks.integer(key, getattr(self, key), at_least=1)
        self.precision = checks.choice("precision", str(self.precision), PRECISIONS)
        checks.choice("gradient_clip_algorithm", self.gradient_clip_algorithm, CLIP_ALGORITHMS)
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
    """

    def __init__(self, settings: TrainerSettings, *, model: nn.Module, phases: Sequence[Phase], data, callbacks=()):
        counting = [p.name for p in phases if p.counts_as_step]
        assert len(counting) == 1, f"exactly one phase must count as the training step, got {counting}"
        assert len({p.name for p in phases}) == len(phases), "phase names must be unique (checkpoint keys)"
        self.settings, self.model, self.phases, self.data = settings, model, list(phases), data
        self.callbacks: list[Callback] = list(callbacks)
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
        self.skipped_steps = {p.name: 0 for p in self.phases}  # optimizer steps the scaler skipped (inf/NaN)
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

    def fit(self) -> dict[str, float]:
        """Train until ``max_steps``; returns the last logged stats and evaluator metrics plus ``step``."""
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
                        self._emit("on_step_end")
            self._emit("on_fit_end")
        finally:
            self._emit("teardown")
        return {**self.metrics, **self.eval_metrics, "step": float(self.step)}

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
        try:
            k = self.settings.accumulate_grad_batches
            step = self.iteration // phase.interval  # this phase's optimizer steps so far
            images = 0
            dtype, enabled = self.amp_dtype or torch.float32, self.amp_dtype is not None  # autocast off at 32
            phase.optimizer.zero_grad(set_to_none=True)
            with amp.scaling(scaler):  # input-gradient penalties scale/unscale with this phase's scaler
                for _ in range(k):
                    real = next(self.data)  # fresh real batch per micro-batch (the loss draws fresh noise)
                    with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
                        loss = phase.loss(real, step)
                    scaler.scale(loss / k).backward()
                    images += real.shape[0]
            self.images_seen += images
            scaler.unscale_(phase.optimizer)  # clip and measure true gradients, not scaled ones
            grad_norm = self._clip(phase, [p for p in phase.module.parameters() if p.grad is not None])
            scaler.step(phase.optimizer)  # skipped when the unscaled gradients hold inf/NaN (fp16)
            scaler.update()
            with warnings.catch_warnings():  # fp16: the scaler may skip the very first optimizer step, by design
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.schedulers[phase.name].step()
            if phase.after_step is not None:
                with torch.no_grad():
                    phase.after_step()
            if phase.counts_as_step and self.ema is not None:
                self.ema.update(images)
        finally:
            for p, flag in zip(self.params, flags):
                p.requires_grad_(flag)
        if scaler.is_enabled():  # same test as the scaler's: any non-finite gradient
            self.skipped_steps[phase.name] += ~torch.isfinite(grad_norm)
        report(f"grad_norm/{phase.name}", grad_norm)  # before clipping
        report(f"lr/{phase.name}", lr)

    def _clip(self, phase: Phase, params: list[torch.Tensor]) -> torch.Tensor:
        """Clip in place per the phase's (else the trainer's) settings; return the pre-clip total L2 norm."""
        if not params:
            return torch.zeros((), device=self.device)
        val = self.settings.gradient_clip_val if phase.gradient_clip_val is None else phase.gradient_clip_val
        algorithm = phase.gradient_clip_algorithm or self.settings.gradient_clip_algorithm
        if val and algorithm == "norm":
            return torch.nn.utils.clip_grad_norm_(params, val)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if val:
            torch.nn.utils.clip_grad_value_(params, val)
        return norm

    def averaged_weights(self):
        """Context: the EMA weights in the generator while sampling/evaluating (nothing without EMA)."""
        return self.ema.swapped() if self.ema is not None else nullcontext()
