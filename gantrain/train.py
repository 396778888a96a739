"""Entry point: ``python -m gantrain +experiment=NAME key=value ...`` (also the ``gantrain`` script).

This module composes the config and :mod:`gantrain.build` instantiates everything from it, puts it on the device
and hands typed objects to the :class:`~gantrain.trainer.Trainer`: the two are the only code that reads the config.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gantrain import distributed
from gantrain.allocator import keep_freed_memory
from gantrain.build import assemble
from gantrain.config import CONFIG_MODULE, register
from gantrain.hydra_errors import user_error
from gantrain.preemption import stop_on_signals
from gantrain.rundir import LOG_FILE, HeldLines, RunDirectoryLock, log_file, save_configs, stop_message
from gantrain.sweep import record

log = logging.getLogger("gantrain")
register()  # the schemas and the resolvers


class Interrupted(Exception):
    """``fit()`` stopped early on a signal; the checkpoint at that step is written. ``exit_code`` is 128 + the
    signal number (what a shell reports for a process killed by it)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python -m gantrain OVERRIDES...`` would run, via Hydra's Compose API (tests, scripts)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


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
            held = stack.enter_context(HeldLines()) if group.is_main else None  # train.log gets them when it opens
            if group.is_main:  # the first line: what takes the time before the first step
                log.info("loading the data and building the networks")
            run = assemble(cfg, run_dir, group)
        except Exception as e:
            group.check_all(e)
        group.check_all(None)
        if lock is not None:
            lock.claim()
        if group.is_main:
            stack.enter_context(log_file(run_dir / LOG_FILE, held))
        log.info("run directory: %s", run_dir.resolve())
        trainer, checkpoints = run.trainer, run.checkpoints
        if checkpoints.start_step >= trainer.settings.max_steps:
            source, start, max_steps = checkpoints.source, checkpoints.start_step, trainer.settings.max_steps
            log.info("%s is already at step %d >= trainer.max_steps=%d: nothing to do", source, start, max_steps)
            return {**checkpoints.saved_metrics, "step": float(start)}
        if group.is_main:
            save_configs(cfg, run_dir)
        with stop_on_signals(run.stopper) as received:  # under DDP the rank agreement, which stops every rank
            metrics = trainer.fit()
        if group.distributed and trainer.stop_reason is not None:
            received.signum = int(signal.Signals[trainer.stop_reason])  # maybe another rank's signal
        if received.signum is not None:
            message = stop_message(run_dir, received.name, trainer.step, trainer.settings.max_steps)
            if group.is_main:
                log.warning("%s", message)
            else:
                log.warning("rank %d stopped by %s after step %d", group.rank, received.name, trainer.step)
            raise Interrupted(message, received.exit_code)
        return metrics  # RunLog's last line named the run directory, checkpoint, samples and TensorBoard


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
    return record(cfg, monitored(cfg, metrics), metrics)  # the value a sweeper optimizes (a sweep ranks it)


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
    Hydra prints those over several lines itself unless ``HYDRA_FULL_ERROR`` is set, when it re-raises them; so that
    is set while Hydra runs and the exception is reported here (a user who set it gets Hydra's full tracebacks)."""
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
