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

It also owns logging (one stats sink -> TensorBoard + tqdm), sample grids and checkpoints, and does
them on rank 0 only. Losses and models never see a writer, a config or a device string.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import save_image
from tqdm.auto import tqdm

from gantrain import amp
from gantrain import checkpoint as ckpt_io
from gantrain.checkpoint import CheckpointError
from gantrain.ema import EMA
from gantrain.errors import ConfigError
from gantrain.files import atomic_write
from gantrain.optim import Schedule
from gantrain.phase import Phase
from gantrain.stats import Collector, collecting, report

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
CLIP_ALGORITHMS = ("norm", "value")


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
            self.ema = EMASettings(**self.ema)
        if self.ema.half_life_images < 0:
            raise ConfigError(f"trainer.ema.half_life_images={self.ema.half_life_images}: must be >= 0 (0 = off)")
        for key in (
            "max_steps",
            "n_critic",
            "accumulate_grad_batches",
            "log_every_n_steps",
            "sample_every_n_steps",
            "num_samples",
            "checkpoint_every_n_steps",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}={getattr(self, key)}: must be >= 1")
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        self.precision = str(self.precision)
        if self.gradient_clip_algorithm not in CLIP_ALGORITHMS:
            allowed = ", ".join(CLIP_ALGORITHMS)
            raise ConfigError(f"trainer.gradient_clip_algorithm={self.gradient_clip_algorithm!r}; allowed: {allowed}")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ConfigError(f"trainer.gradient_clip_val={self.gradient_clip_val}: must be > 0 or null")


def resolve_device(spec: str, key: str = "trainer.device") -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; anything else must name an available torch device."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec!r} but CUDA is not available here; use {key}=auto or cpu")
    return device


class Trainer:
    """Runs the phase loop.

    Args:
        settings: the ``trainer.*`` values.
        model: the container of every trained network (checkpointed whole; its parameters outside
            the active phase's module are frozen while that phase runs).
        phases: from the objective, in the order they run within an iteration.
        data: an endless batch iterator with ``state_dict``/``load_state_dict`` (``BatchStream``),
            already yielding tensors on the training device.
        run_dir: where TensorBoard events, ``samples/`` and ``checkpoints/last.ckpt`` go.
        sampler: returns the picture to log as ``samples`` (``(3, H, W)`` in [0, 1]: an image grid, a
            scatter plot, ...), from fixed noise and without changing any state; or a dict of named
            pictures (``samples``, ``reconstructions``, ...), each logged under its name.
        evaluator: returns metrics (name -> float) of the current model, computed and logged with
            each sample grid and at the end (e.g. the 2-D mixture's modes covered); must not use
            the global RNG (a resumed run must continue bit-identically).
        config: the resolved config, saved in checkpoints and logged as text/hparams.
        compat: the part of the config a checkpoint must match to be resumed (model, loss).
        is_main: rank 0 logs and writes checkpoints; other ranks only train.
    """

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        model: nn.Module,
        phases: Sequence[Phase],
        data: Any,
        run_dir: str | Path,
        sampler: Callable[[], torch.Tensor] | None = None,
        evaluator: Callable[[], dict[str, float]] | None = None,
        config: dict | None = None,
        compat: dict | None = None,
        is_main: bool = True,
    ):
        counting = [p.name for p in phases if p.counts_as_step]
        assert len(counting) == 1, f"exactly one phase must count as the training step, got {counting}"
        assert len({p.name for p in phases}) == len(phases), "phase names must be unique (checkpoint keys)"
        self.s = settings
        self.model, self.phases, self.data = model, list(phases), data
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.ckpt"
        if settings.resume is None and self.ckpt_path.exists():
            # Starting from scratch here would overwrite that checkpoint at the first save.
            raise CheckpointError(
                f"run directory '{self.run_dir}' already holds a checkpoint ({self.ckpt_path}); continue it with "
                "trainer.resume=auto, or start a new run in another hydra.run.dir"
            )
        self.sampler, self.evaluator = sampler, evaluator
        self.config, self.compat = config or {}, compat or {}
        self.is_main = is_main
        self.params = list(model.parameters())
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.amp_dtype = PRECISIONS[settings.precision]
        for phase in self.phases:
            _check_phase_clip(phase)
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
        self._t0, self._images0 = time.perf_counter(), 0  # images/s since the last log
        self.writer: SummaryWriter | None = None
        self.metrics: dict[str, float] = {}  # the last logged training stats
        self.eval_metrics: dict[str, float] = {}  # the evaluator's last results

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, float]:
        """Train until ``max_steps``; returns the last logged stats plus ``step``."""
        self._maybe_resume()
        if self.step >= self.s.max_steps:
            log.info(
                "checkpoint is already at step %d >= trainer.max_steps=%d; nothing to do", self.step, self.s.max_steps
            )
        if self.is_main:
            self.writer = SummaryWriter(log_dir=str(self.run_dir))
            self._log_config()
        bar = tqdm(
            total=self.s.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=None if (self.is_main and self.s.progress_bar) else True,
        )
        self._t0, self._images0 = time.perf_counter(), self.images_seen
        try:
            with collecting(self.collector):
                while self.step < self.s.max_steps:
                    stepped = False
                    for phase in self.phases:
                        if (self.iteration + 1) % phase.interval == 0:
                            self._run_phase(phase)
                            stepped |= phase.counts_as_step
                    self.iteration += 1
                    if stepped:
                        self.step += 1
                        bar.update(1)
                        self._after_step(bar)
            self._log_stats(bar)
            if self.step % self.s.sample_every_n_steps:  # else _after_step just wrote this step's grid
                self._write_samples()
            self._save_checkpoint()
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        return {**self.metrics, **self.eval_metrics, "step": float(self.step)}

    def _run_phase(self, phase: Phase) -> None:
        flags = [p.requires_grad for p in self.params]
        active = {id(p) for p in phase.module.parameters()}
        for p in self.params:
            p.requires_grad_(id(p) in active)
        scaler = self.scalers[phase.name]
        lr = phase.optimizer.param_groups[0]["lr"]  # the LR this step uses
        try:
            k = self.s.accumulate_grad_batches
            step = self.iteration // phase.interval  # this phase's optimizer steps so far
            images = 0
            phase.optimizer.zero_grad(set_to_none=True)
            with amp.scaling(scaler):  # input-gradient penalties scale/unscale with this phase's scaler
                for _ in range(k):
                    real = next(self.data)  # fresh real batch per micro-batch (the loss draws fresh noise)
                    with self._autocast():
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

    def _autocast(self) -> torch.autocast:
        """Autocast to the precision's dtype around forward passes; disabled (a no-op) at 32."""
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)

    def _clip(self, phase: Phase, params: list[torch.Tensor]) -> torch.Tensor:
        """Clip in place per the phase's (else the trainer's) settings; return the pre-clip total L2 norm."""
        if not params:
            return torch.zeros((), device=self.device)
        val = self.s.gradient_clip_val if phase.gradient_clip_val is None else phase.gradient_clip_val
        algorithm = phase.gradient_clip_algorithm or self.s.gradient_clip_algorithm
        if val and algorithm == "norm":
            return torch.nn.utils.clip_grad_norm_(params, val)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if val:
            torch.nn.utils.clip_grad_value_(params, val)
        return norm

    def averaged_weights(self):
        """Context: the EMA weights in the generator while sampling/evaluating (nothing without EMA)."""
        return self.ema.swapped() if self.ema is not None else nullcontext()

    def _after_step(self, bar: tqdm) -> None:
        if self.step % self.s.log_every_n_steps == 0:
            self._log_stats(bar)
        if self.step % self.s.sample_every_n_steps == 0:
            self._write_samples()
        if self.step % self.s.checkpoint_every_n_steps == 0 and self.step < self.s.max_steps:
            self._save_checkpoint()  # the final one is written after the loop

    # ---------------------------------------------------------------- logging
    def _log_stats(self, bar: tqdm) -> None:
        stats = self.collector.drain()
        if not stats:  # nothing ran since the last log (e.g. the final call right after a logged step)
            return
        now = time.perf_counter()
        stats["perf/images_per_s"] = (self.images_seen - self._images0) / max(now - self._t0, 1e-9)
        for name, scaler in self.scalers.items():
            if scaler.is_enabled():
                stats[f"amp/scale/{name}"] = scaler.get_scale()
                stats[f"amp/skipped_steps/{name}"] = float(self.skipped_steps[name])
        self._t0, self._images0 = now, self.images_seen
        self.metrics = stats
        if self.writer is not None:
            for name, value in stats.items():
                self.writer.add_scalar(name, value, self.step)
        shown = {k: f"{v:.3g}" for k, v in stats.items() if k.count("/") == 1 and k.startswith("loss/")}
        shown["img/s"] = f"{stats['perf/images_per_s']:.0f}"
        bar.set_postfix(shown, refresh=False)

    def _write_samples(self) -> None:
        if not self.is_main:
            return
        if self.evaluator is not None:
            with self.averaged_weights():
                self.eval_metrics = {k: float(v) for k, v in self.evaluator().items()}
            if self.writer is not None:
                for name, value in self.eval_metrics.items():
                    self.writer.add_scalar(name, value, self.step)
            log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in self.eval_metrics.items()))
        if self.sampler is None:
            return
        with self.averaged_weights():
            pictures = self.sampler()
        if isinstance(pictures, torch.Tensor):
            pictures = {"samples": pictures}
        for name, picture in pictures.items():
            grid = picture.float().cpu()  # (3, H', W') in [0, 1]
            prefix = "" if name == "samples" else f"{name}_"
            path = self.run_dir / "samples" / f"{prefix}step_{self.step:07d}.png"
            atomic_write(path, partial(_save_png, grid), fsync=False)
            if self.writer is not None:
                self.writer.add_image(name, grid, self.step)

    def _log_config(self) -> None:
        import yaml  # PyYAML comes with hydra/omegaconf

        text = yaml.safe_dump(self.config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), self.step)  # indented = code block
        flat = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in ckpt_io.flatten_dict(self.config).items()
        }
        for summary in hparams(flat, {"loss/D": 0.0, "loss/G": 0.0}):
            self.writer._get_file_writer().add_summary(summary)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": ckpt_io.FORMAT,
            "step": self.step,
            "iteration": self.iteration,
            "images_seen": self.images_seen,
            "model": self.model.state_dict(),
            "optimizers": {p.name: p.optimizer.state_dict() for p in self.phases},
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            "scalers": {name: s.state_dict() for name, s in self.scalers.items()},
            "skipped_steps": {name: int(n) for name, n in self.skipped_steps.items()},
            "ema": None if self.ema is None else {"module": self.ema_module_name, **self.ema.state_dict()},
            "rng": ckpt_io.rng_state(),
            "data": self.data.state_dict(),
            "config": self.config,
            "compat": self.compat,
            "settings": asdict(self.s),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        diffs = ckpt_io.config_differences(state.get("compat", {}), self.compat)
        if diffs:
            raise CheckpointError(
                f"trainer.resume: {source} was written by a different model/loss configuration:\n  "
                + "\n  ".join(diffs[:20])
                + "\nResume with the same model and loss settings, or start a new run in another hydra.run.dir."
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"trainer.resume: {source} does not fit this model: {e}") from None
        missing = {p.name for p in self.phases} - set(state["optimizers"])
        if missing:
            raise CheckpointError(f"trainer.resume: {source} has no optimizer state for phases {sorted(missing)}")
        for p in self.phases:
            try:
                p.optimizer.load_state_dict(state["optimizers"][p.name])
            except (ValueError, KeyError) as e:  # another optimizer type, Lookahead on/off, other groups
                raise CheckpointError(
                    f"trainer.resume: {source} holds optimizer state for phase {p.name} that does not fit "
                    f"{type(p.optimizer).__name__} ({e}); resume with the optimizer it was trained with"
                ) from None
        for name, sched in self.schedulers.items():
            if name in state.get("schedulers", {}):
                sched.load_state_dict(state["schedulers"][name])
        for name, scaler in self.scalers.items():
            saved = state.get("scalers", {}).get(name)
            if scaler.is_enabled() and saved:  # empty when it was written at another precision
                scaler.load_state_dict(saved)
        self.skipped_steps.update(state.get("skipped_steps", {}))
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:
                log.warning("trainer.resume: %s has no EMA weights; the EMA starts from the current weights", source)
                self.ema = EMA(self.ema.module, self.ema.half_life_images)
        self.data.load_state_dict(state["data"])
        ckpt_io.set_rng_state(state["rng"])
        self.step, self.iteration, self.images_seen = state["step"], state["iteration"], state["images_seen"]
        saved_max = state.get("settings", {}).get("max_steps", self.s.max_steps)
        if saved_max != self.s.max_steps and any(p.schedule is not None for p in self.phases):
            log.warning(
                "trainer.resume: trainer.max_steps changed from %d to %d; the LR schedules keep the checkpoint's "
                "horizon (%d steps)",
                saved_max,
                self.s.max_steps,
                saved_max,
            )

    def _maybe_resume(self) -> None:
        resume = self.s.resume
        if resume is None:
            return
        path = self.ckpt_path if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            log.info("trainer.resume=auto: no checkpoint at %s, starting from scratch", path)
            return
        self.load_state_dict(ckpt_io.load(path), source=f"checkpoint '{path}'")
        log.info("resumed from %s at step %d", path, self.step)

    def _save_checkpoint(self) -> None:
        if self.is_main:
            ckpt_io.save_atomic(self.state_dict(), self.ckpt_path)


def _check_phase_clip(phase: Phase) -> None:
    if phase.gradient_clip_val is not None and phase.gradient_clip_val < 0:
        raise ConfigError(
            f"gradient_clip_val={phase.gradient_clip_val} for phase {phase.name}: must be >= 0 "
            "(0 = no clipping for this network) or null (the trainer's setting)"
        )
    if phase.gradient_clip_algorithm not in (None, *CLIP_ALGORITHMS):
        raise ConfigError(
            f"gradient_clip_algorithm={phase.gradient_clip_algorithm!r} for phase {phase.name}; "
            f"allowed: null (the trainer's), {', '.join(CLIP_ALGORITHMS)}"
        )


def _save_png(picture: torch.Tensor, f) -> None:
    save_image(picture, f, format="png")
