"""Entry point: ``python -m gantrain +experiment=NAME key=value ...`` (also the ``gantrain`` script).

This is the only module that reads the config. It composes and instantiates everything, puts it
on the device, and hands typed objects to the :class:`~gantrain.trainer.Trainer`.
"""

from __future__ import annotations

import importlib.resources
import inspect
import logging
import os
import random
import re
import sys
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

from gantrain.config import register
from gantrain.errors import ConfigError, GantrainError
from gantrain.hydra_errors import config_error
from gantrain.runlog import standard_callbacks
from gantrain.trainer import Trainer, resolve_device

# configs/ ships inside the package as `gantrain.configs` (pyproject's package-dir), so an installed
# wheel finds the recipes as well as an editable clone does.
CONFIG_MODULE = "gantrain.configs"
CONFIG_DIR = Path(str(importlib.resources.files(CONFIG_MODULE)))
log = logging.getLogger("gantrain")

register()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python -m gantrain OVERRIDES...`` would run, via Hydra's Compose API (tests, scripts)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def build(cfg: DictConfig, run_dir: str | Path) -> Trainer:
    """Instantiate model, objective, per-network updates, data and Trainer from a composed config.

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
    stream = within("data", data.stream, seed=cfg.seed, device=device)  # reads the dataset: holdout, batch size
    # Fixed noise from its own generators: sample grids and evaluation never consume the training RNG.
    fixed_noise = model.noise(settings.num_samples, device, generator=torch.Generator(device).manual_seed(cfg.seed))
    evaluator = None
    if hasattr(data, "evaluate"):
        eval_noise = model.noise(
            data.num_eval_samples, device, generator=torch.Generator(device).manual_seed(cfg.seed + 1)
        )
        evaluator = lambda: data.evaluate(model.sample(eval_noise))
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return Trainer(
        settings,
        model=model,
        phases=phases,
        data=stream,
        callbacks=standard_callbacks(
            settings,
            run_dir,
            sampler=objective.sampler(model, data.render, fixed_noise, stream),
            evaluator=evaluator,
            config=resolved,
            compat={"model": resolved["model"], "loss": resolved["loss"]},
        ),
    )


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
    """Build and fit; returns the final metrics. Testable without Hydra's runtime (Compose API)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", run_dir.resolve())
    trainer = build(cfg, run_dir)  # fails on bad input before anything in run_dir is written
    # Hydra's .hydra/config.yaml keeps the ${...} interpolations; this is what actually ran.
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    metrics = trainer.fit()
    log.info("finished: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def user_error(e: BaseException, node: str = "") -> GantrainError | None:
    """The user-input error behind ``e``, if any, its key put under the config node that raised it.

    Hydra wraps errors raised while instantiating and names the node (``full_key: loss.gp``);
    ``node`` is the fallback for errors raised outside ``instantiate``. Hydra's errors about the
    command line and config files (an unknown key or option, a value of the wrong type) become one
    line too (:func:`gantrain.hydra_errors.config_error`).
    """
    while e is not None and not isinstance(e, GantrainError):
        if isinstance(e, InstantiationException):
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
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise  # a bug: keep the traceback
        log.error("%s", err)  # one line on the console and in the run's log, no traceback
        raise SystemExit(1) from None
    return monitored(cfg, metrics)  # the value a sweeper optimizes


def monitored(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """``trainer.monitor``'s value in a run's final ``metrics`` (NaN, with a warning, if it was never logged)."""
    monitor = cfg.trainer.monitor
    if monitor not in metrics:
        log.warning("trainer.monitor=%s was never logged (logged: %s); a sweeper gets NaN", monitor, sorted(metrics))
    return metrics.get(monitor, float("nan"))


def main() -> None:
    """``python -m gantrain``: a mistake Hydra finds before the job starts (composing the config) is one line too.

    Hydra prints those over several lines itself unless ``HYDRA_FULL_ERROR`` is set, in which case it
    re-raises them; so that is set while Hydra runs and the exception is reported here. A user who
    set ``HYDRA_FULL_ERROR`` gets Hydra's full tracebacks as before.
    """
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


if __name__ == "__main__":
    main()
