"""Every typed setting of a run's loop, in a leaf module: the Trainer, the EMA, DDP, the non-finite guard and
evaluation read their own dataclass from here, and nothing here imports a part of gantrain that runs anything
(only :mod:`gantrain.checks`, the validation helpers), so settings never close an import circle.

``trainer.*`` is one flat config node (:class:`TrainerSettings`, whose fields are the keys and their one
default); the parts that need only a few of its keys get a typed view of them (:attr:`TrainerSettings.nonfinite`,
:attr:`TrainerSettings.evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from gantrain import checks

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
NONFINITE_POLICIES = ("stop", "skip")
GRAD_NORM_LOGS = ("total", "layer")
CLIP_ALGORITHMS = ("norm", "value")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's


def check_clipping(gradient_clip_val: Optional[float], gradient_clip_algorithm: Optional[str]) -> None:
    """A network's own clipping: None = the trainer's setting; a value of 0 = no clipping for it."""
    if gradient_clip_val is not None:
        checks.number("gradient_clip_val", gradient_clip_val, ge=0, hint="0 = no clipping; null = the trainer's")
    checks.choice("gradient_clip_algorithm", gradient_clip_algorithm, (None, *CLIP_ALGORITHMS))


@dataclass
class EMASettings:
    """``trainer.ema.*``: EMA of the generator (of the counting phase's network)."""

    half_life_images: float = 0.0  # images for the EMA weight of a sample to halve (stylegan2-ada: 10k); 0 = off


@dataclass
class DDPSettings:
    """``trainer.ddp.*``: how the networks are replicated (used only under ``torchrun``/SLURM)."""

    broadcast_buffers: bool = True  # DDP's: rank 0's buffers at each forward (stylegan2-ada: false); synced each step
    sync_batchnorm: bool = False  # BatchNorm statistics over the whole batch of all ranks (CUDA only)
    find_unused_parameters: bool = False  # for a loss that leaves some of its network's parameters without a gradient


@dataclass(frozen=True)
class NonFiniteSettings:
    """What :class:`gantrain.nonfinite.NonFiniteGuard` does with a NaN/inf (``trainer.on_nonfinite`` and
    ``trainer.max_consecutive_skips``)."""

    on_nonfinite: str = "stop"
    max_consecutive_skips: int = 20


@dataclass(frozen=True)
class EvaluationSettings:
    """When :class:`gantrain.metrics.loop.Evaluation` runs and what it keeps the best of."""

    every: int = 0
    monitor: str = "loss/G"
    mode: str = "auto"


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
    monitor_mode: str = "auto"  # min | max | auto (max: elbo, precision, recall, class_accuracy, toy/*)

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

    @property
    def nonfinite(self) -> NonFiniteSettings:
        return NonFiniteSettings(self.on_nonfinite, self.max_consecutive_skips)

    @property
    def evaluation(self) -> EvaluationSettings:
        return EvaluationSettings(self.eval_every_n_steps, self.monitor, self.monitor_mode)
