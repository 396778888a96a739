"""Entry point: ``python -m gantrain +experiment=NAME key=value ...`` (also the ``gantrain`` script).

This is the only module that reads the config. It composes and instantiates everything, puts it
on the device, and hands typed objects to the :class:`~gantrain.trainer.Trainer`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import inspect
import logging
import os
import random
import re
import shlex
import signal
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from gantrain import distributed, speed
from gantrain.allocator import keep_freed_memory
from gantrain.checkpoint import Checkpointing
from gantrain.config import register
from gantrain.errors import ConfigError, GantrainError
from gantrain.files import FULL, NOT_WRITABLE, write_error
from gantrain.hydra_errors import config_error
from gantrain.preemption import stop_on_signals
from gantrain.rundir import RunDirectoryLock, unique_suffix
from gantrain.runlog import standard_callbacks
from gantrain.trainer import Trainer, resolve_device

# configs/ ships inside the package as `gantrain.configs` (pyproject's package-dir), so an installed
# wheel finds the recipes as well as an editable clone does.
CONFIG_MODULE = "gantrain.configs"
CONFIG_DIR = Path(str(importlib.resources.files(CONFIG_MODULE)))
log = logging.getLogger("gantrain")

register()
# `${unique:}` in the default hydra.run.dir: two launches in the same second get two directories.
# Cached in the config (as Hydra's ${now:}), so that a launcher's jobs in other processes (submitit, joblib)
# resolve the sweep directory the launcher made, and the resolver pickles by reference.
OmegaConf.register_new_resolver("unique", unique_suffix, use_cache=True, replace=True)


def run_name(overrides: str, prefix: str = "") -> str:
    """``hydra.job.override_dirname`` as one directory name (``${run_name:...}`` in train.yaml): ``prefix`` and the
    overrides with path separators as ``_``; a long one is cut, with a hash of the whole so that it stays unique
    and the same on every rerun (a sweep's ``trainer.resume=auto`` finds its jobs again). "" without overrides."""
    if not overrides:
        return ""
    name = overrides.replace("/", "_").replace(os.sep, "_")
    if len(name) > 120:
        name = name[:100] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return prefix + name


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
LOG_FILE = "train.log"


class Interrupted(Exception):
    """``fit()`` stopped early on a signal; the checkpoint at that step is written. ``exit_code`` is 128 + the
    signal number (what a shell reports for a process killed by it)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python -m gantrain OVERRIDES...`` would run, via Hydra's Compose API (tests, scripts)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def build(cfg: DictConfig, run_dir: str | Path, group: distributed.Group = distributed.SINGLE) -> Trainer:
    """Instantiate model, objective, per-network updates, data and Trainer from a composed config.

    Under ``torchrun`` (``group``: this rank's place) every rank builds the same model from the same seed,
    draws its own shard of the data and trains through DDP wrappers (:mod:`gantrain.distributed`).

    The build flows one way: each ``optim.<net>`` node instantiates to a complete
    :class:`~gantrain.optim.NetworkOptim`, the objective turns the model and those updates into
    complete phases, and the objective also says which pictures a run shows.
    """
    seed_everything(cfg.seed)
    settings = within("trainer", instantiate, cfg.trainer)
    device = resolve_device(settings.device)
    model = within("model", instantiate, cfg.model).to(device)  # device placement happens here and only here
    objective = within("loss", instantiate, cfg.loss).to(device)  # fixed networks inside terms (VGG) move too
    networks = getattr(objective, "networks", tuple(cfg.optim))
    missing = [n for n in networks if n not in cfg.optim]
    if missing:
        raise ConfigError(f"optim: {type(objective).__name__} trains {list(networks)} but optim has no {missing}")
    absent = [n for n in networks if getattr(model, n, None) is None]
    if absent:
        raise ConfigError(
            f"loss: {type(objective).__name__} trains {list(networks)} but the model has no {absent} "
            f"(model.{absent[0]} is null); pick a model with that network, or a loss for the ones it has"
        )
    unused = [n for n in cfg.optim if n not in networks]
    if unused:
        log.info("optim.%s: not used, %s trains only %s", "/".join(unused), type(objective).__name__, list(networks))
    build_update = lambda n: instantiate(cfg.optim[n]).build(getattr(model, n).parameters(), device)  # noqa: E731
    updates = {name: within(f"optim.{name}", build_update, name) for name in networks}
    phases = within("loss", objective.phases, model, updates, n_critic=settings.n_critic)
    data = within("data", instantiate, cfg.data)
    check_fit(model, data)
    model.to_data_units = data.to_data_units  # what generate() hands out: the data's own units
    if not group.distributed:
        stream = within("data", data.stream, seed=cfg.seed, device=device)  # reads the dataset: holdout, batch size
    elif "world_size" in inspect.signature(data.stream).parameters:
        stream = within("data", data.stream, seed=cfg.seed, device=device, rank=group.rank, world_size=group.world_size)
    else:
        raise ConfigError(
            f"data: {type(data).__name__} cannot be split between {group.world_size} processes (its stream "
            "has no rank); train it in one process, or use image data (digits, mnist, folder, ...)"
        )
    # trainer.compile/channels_last/matmul_precision; before DDP, which keeps the parameters' memory format
    stream = within("trainer", speed.apply, settings, model, objective, stream, device)
    if group.distributed:
        phases = within("trainer.ddp", distributed.replicate, model, phases, settings.ddp, device)
    # Fixed noise from its own generators: sample grids and evaluation never consume the training RNG.
    fixed_noise = model.noise(settings.num_samples, device, generator=torch.Generator(device).manual_seed(cfg.seed))
    evaluators, eval_tags = evaluation(cfg, model, data, device)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    callbacks = standard_callbacks(
        settings,
        run_dir,
        sampler=objective.sampler(model, data.render, fixed_noise, stream),
        # rank 0 only; the other ranks wait for it at their next collective (gantrain.distributed)
        evaluator=(lambda: {k: v for e in evaluators for k, v in e().items()}) if evaluators else None,
        eval_tags=eval_tags,
        config=resolved,
        hparams=hparams_row(cfg),
        about={"command": command_line(), "code": code_version()},
        is_main=group.is_main,
        world_size=group.world_size,
    )
    if group.distributed:
        first, last = distributed.callbacks(group, cfg.seed, settings.ddp)
        callbacks = [first, *callbacks, last]
    return Trainer(settings, model=model, phases=phases, data=stream, callbacks=callbacks, world_size=group.world_size)


# data keys that change how the images are loaded, not which: not part of the reference features' cache key
LOADING_KEYS = ("batch_size", "num_workers", "in_memory", "download", "skip_corrupt", "root")


def evaluation(cfg: DictConfig, model, data, device: torch.device) -> tuple[list, list[str]]:
    """(the evaluators of this run, the names they report): the 2-D mixtures' mode metrics, ``metrics=``'s
    FID/KID/PR on samples (reference features computed or read from the cache now, before training) and a VAE's
    held-out ELBO (``data.holdout``). Each draws its own fixed noise: none touches the training RNG."""
    evaluators, tags = [], []
    if hasattr(data, "evaluate"):  # 2-D mixtures: modes covered, % high-quality samples
        noise = model.noise(data.num_eval_samples, device, generator=torch.Generator(device).manual_seed(cfg.seed + 1))
        evaluators.append(lambda: data.evaluate(model.sample(noise)))
        tags += ["toy/modes", "toy/hq"]
    if cfg.get("metrics") is not None:
        if not hasattr(data, "training_dataset"):
            raise ConfigError(f"metrics: FID/KID/PR compare images, and {type(data).__name__} has none; drop metrics=")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # an init draws no training RNG
            metrics = within("metrics", instantiate, cfg.metrics).to(device)
        key = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in LOADING_KEYS}
        within("metrics", metrics.reference_features, data, key)
        evaluators.append(lambda: metrics.evaluate(model, data, key))
        tags += metrics.tags
    if callable(getattr(model.g, "encode", None)) and getattr(data, "holdout", 0) > 0:
        from gantrain import elbo

        heldout = within("data", data.heldout, device)
        likelihood = elbo.likelihood_of_loss(cfg.loss)
        seed = cfg.seed + 2

        def heldout_elbo() -> dict[str, float]:
            generator = torch.Generator(device).manual_seed(seed)
            batches = heldout.split(data.batch_size)
            nll = elbo.evaluate_nll(
                model.g, batches, k=1, log_likelihood=likelihood, progress=False, generator=generator
            )
            return {"metrics/elbo": nll["elbo"]}

        evaluators.append(heldout_elbo)
        tags.append("metrics/elbo")
    return evaluators, tags


def hparams_row(cfg: DictConfig) -> dict[str, Any]:
    """The hparams table's row: the recipe, the seed and the keys overridden on the command line (of a multirun,
    the swept ones: an override every job shares is no column), with their values as they ran."""
    row: dict[str, Any] = {"experiment": cfg.experiment_name, "seed": cfg.seed}
    # what a float32 matmul/convolution computes with (speed.apply set both for this run): a column in every run
    row["trainer.matmul_precision"] = OmegaConf.select(cfg, "trainer.matmul_precision", default="highest")
    row["cudnn.benchmark"] = bool(torch.backends.cudnn.benchmark)
    if not HydraConfig.initialized():
        return row
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    shared: set[str] = set()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the command line's one-value overrides are the same in every job
        try:
            parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a])
            shared = {o.key_or_group for o in parsed if not o.is_sweep_override()}
        except Exception:  # noqa: BLE001 - the command line Hydra already parsed; keep every override then
            shared = set()
    for override in hydra_cfg.overrides.task:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra.") or key == "trainer.resume" or key in shared:
            continue
        selected = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        row[key] = selected if isinstance(selected, (int, float, str, bool)) else value
    return row


def command_line() -> str:
    """The command that started this run (under Hydra), else a note."""
    if not HydraConfig.initialized():
        return "(started from Python, not the command line)"
    return shlex.join(["python", "-m", "gantrain", *sys.argv[1:]])


def code_version() -> str:
    """The git commit of the gantrain code that runs (noting uncommitted changes), or "not a git checkout"."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=10)
        lines = top.stdout.split()
        if top.returncode or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return "not a git checkout"
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return lines[1] + (" with uncommitted changes" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"


def check_fit(model: Any, data: Any) -> None:
    """The model is built for the data's sample shape (by default the data's resolution and the model's
    channels follow the other; an override of one side alone would fail as a shape error mid-step)."""
    for key in ("resolution", "channels"):
        want, have = getattr(model, key, None), getattr(data, key, None)
        if want is not None and have is not None and want != have:
            raise ConfigError(
                f"data.{key}={have!r} but model.{key}={want!r}: the model is built for other images; make them "
                "equal (data.resolution follows model.resolution and model.channels data.channels by default)"
            )
    want, have = getattr(model, "dim", None), getattr(data, "dim", None)
    if want is not None and have is not None and want != have:
        raise ConfigError(f"model.dim={want!r}: must be {have}, the size of a sample of {type(data).__name__}")


def within(node: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a user error it raises names its key under ``node``."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        err = user_error(e, node)
        if err is None:
            raise
        raise err from None


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Build and fit in ``run_dir``; returns the final metrics. Testable without Hydra's runtime (Compose API).

    The run holds ``run_dir``'s lock from the start, and everything that can refuse it (bad input, a
    checkpoint in the way, a resume from another run) happens before the first byte is written there.
    A signal ends it after the step in flight with a checkpoint, raising :class:`Interrupted`.

    Under ``torchrun``/SLURM every rank calls this; they share rank 0's ``run_dir``, where only rank 0 takes
    the lock and writes, and a rank that refuses to start makes every rank refuse.
    """
    group = distributed.init_from_env(str(cfg.trainer.device))
    run_dir = distributed.shared_run_dir(group, run_dir)
    with ExitStack() as stack:
        try:
            lock = stack.enter_context(RunDirectoryLock(run_dir)) if group.is_main else None
            trainer = build(cfg, run_dir, group)
        except Exception as e:
            group.check_all(e)
        group.check_all(None)
        if lock is not None:
            lock.claim()
        if group.is_main:
            stack.enter_context(log_file(run_dir / LOG_FILE))
        log.info("run directory: %s", run_dir.resolve())
        checkpointing = next((c for c in trainer.callbacks if isinstance(c, Checkpointing)), None)
        if checkpointing is not None and checkpointing.start_step >= trainer.settings.max_steps:
            log.info(
                "%s is already at step %d >= trainer.max_steps=%d: nothing to do",
                checkpointing.source,
                checkpointing.start_step,
                trainer.settings.max_steps,
            )
            return {**checkpointing.saved_metrics, "step": float(checkpointing.start_step)}
        if group.is_main:
            save_configs(cfg, run_dir)
        # under DDP the handlers tell the rank agreement (the first callback), which stops every rank
        stopper = trainer.callbacks[0] if group.distributed else trainer
        with stop_on_signals(stopper) as received:
            metrics = trainer.fit()
        if group.distributed and trainer.stop_reason is not None:
            received.signum = int(signal.Signals[trainer.stop_reason])  # maybe another rank's signal
        if received.signum is not None:
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            message = (
                f"stopped by {received.name} after step {trainer.step}/{trainer.settings.max_steps}; "
                f"checkpoint: {ckpt}; resume with: {resume_command(run_dir)}"
            )
            if group.is_main:
                log.warning("%s", message)
            else:
                log.warning("rank %d stopped by %s after step %d", group.rank, received.name, trainer.step)
            raise Interrupted(message, received.exit_code)
        return metrics  # RunLog's last line named the run directory, checkpoint, samples and TensorBoard


def save_configs(cfg: DictConfig, run_dir: Path) -> None:
    """``config.yaml`` (resolved: what actually ran; Hydra's copy keeps the ``${...}``) and, under Hydra,
    the ``.hydra/`` files Hydra itself would have written before the run was checked (``hydra.output_subdir``
    is null in train.yaml so that a refused run changes nothing in an existing directory)."""
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), run_dir / ".hydra" / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, run_dir / ".hydra" / "overrides.yaml")


@contextmanager
def log_file(path: Path):
    """Copy every log line to ``path`` (the run's ``train.log``, appended across resumes) inside the block,
    in the console handler's format. Opened only after the run passed its checks."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    console = next((h for h in root.handlers if isinstance(h, logging.StreamHandler) and h.formatter), None)
    fmt = console.formatter if console else logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s")
    handler.setFormatter(fmt)
    root.addHandler(handler)
    try:
        yield
    except Exception as e:
        err = user_error(e)
        if err is not None:  # a user error's one line goes into train.log too; the entry point won't repeat it
            log.error("%s", err)
            e.gantrain_logged = True  # type: ignore[attr-defined]
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: the same overrides, this directory, ``trainer.resume=auto``."""
    overrides = ["<the same overrides>"]
    if HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
        overrides = [o for o in task if not re.match(r"(trainer\.resume|hydra\.run\.dir)=", o)]
    words = ["python", "-m", "gantrain", *overrides, f"hydra.run.dir={run_dir.resolve()}", "trainer.resume=auto"]
    return " ".join(w if w.startswith("<") else shlex.quote(w) for w in words)


def user_error(e: BaseException, node: str = "") -> GantrainError | None:
    """The user-input error behind ``e``, if any, its key put under the config node that raised it.

    Hydra wraps errors raised while instantiating and names the node (``full_key: loss.gp``);
    ``node`` is the fallback for errors raised outside ``instantiate``. Hydra's errors about the
    command line and config files (an unknown key or option, a value of the wrong type) become one
    line too (:func:`gantrain.hydra_errors.config_error`).
    """
    while e is not None and not isinstance(e, GantrainError):
        if isinstance(e, OSError) and e.errno in FULL | NOT_WRITABLE and e.filename:
            e = write_error(e, e.filename)  # a full disk, a read-only run directory
        elif isinstance(e, InstantiationException):
            found = re.search(r"full_key: (\S+)\s*$", str(e))
            node = found.group(1) if found else node
            e = e.__cause__ if not isinstance(e.__cause__, TypeError) else unknown_argument(e, e.__cause__)
        else:
            e = config_error(e, node)  # Hydra's composition and OmegaConf's errors; None for anything else
    return e.within(node) if isinstance(e, ConfigError) else e


def unknown_argument(e: InstantiationException, cause: TypeError) -> ConfigError | None:
    """A key in a YAML node without a schema (a user's own class) that its target does not take."""
    key = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    target = re.search(r"Error in call to target '([\w.]+)'", str(e))
    if key is None or target is None:
        return None  # a TypeError inside the target: a bug, keep the traceback
    try:
        allowed = ", ".join(p for p in inspect.signature(get_object(target.group(1))).parameters if p != "self")
    except (ValueError, TypeError, ImportError):
        allowed = "see its signature"
    return ConfigError(f"{key.group(1)}: not an argument of {target.group(1)}; it takes: {allowed}", key=key.group(1))


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except Interrupted as e:
        raise SystemExit(e.exit_code) from None  # train() logged where the checkpoint is and how to resume
    except KeyboardInterrupt:  # Ctrl-C before training started (while loading data): nothing to save
        log.error("interrupted before training started; nothing was written")
        raise SystemExit(130) from None
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise  # a bug: keep the traceback
        if not getattr(e, "gantrain_logged", False) and distributed.current().is_main:
            log.error("%s", err)  # one line on the console (and train.log); under torchrun rank 0 says it
        raise SystemExit(1) from None
    return monitored(cfg, metrics)  # the value a sweeper optimizes


def monitored(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """``trainer.monitor``'s best evaluated value in a run's final ``metrics`` (``best/<monitor>``), else its last
    logged value (a training stat such as ``loss/G``); NaN, with a warning, if it was never logged."""
    monitor = cfg.trainer.monitor
    if f"best/{monitor}" in metrics:
        return metrics[f"best/{monitor}"]
    if monitor not in metrics:
        logged = sorted(k for k in metrics if not k.startswith("best/"))
        log.warning("trainer.monitor=%s was never logged (logged: %s); a sweeper gets NaN", monitor, logged)
    return metrics.get(monitor, float("nan"))


def main() -> None:
    """``python -m gantrain``: a mistake Hydra finds before the job starts (composing the config) is one line too.

    Hydra prints those over several lines itself unless ``HYDRA_FULL_ERROR`` is set, in which case it
    re-raises them; so that is set while Hydra runs and the exception is reported here. A user who
    set ``HYDRA_FULL_ERROR`` gets Hydra's full tracebacks as before.
    """
    keep_freed_memory()  # a step reuses the previous step's pages instead of faulting fresh ones in (glibc)
    if os.environ.get("HYDRA_FULL_ERROR"):
        return _hydra_main()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise  # a bug: keep the traceback
        print(f"gantrain: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        distributed.shutdown()


if __name__ == "__main__":
    main()
