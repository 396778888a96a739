"""Entry point: ``python -m gantrain +experiment=NAME key=value ...`` (also the ``gantrain`` script).

This is the only module that reads the config. It composes and instantiates everything, puts it
on the device, and hands typed objects to the :class:`~gantrain.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gantrain.config import OPTIM_EXTRA_KEYS, register
from gantrain.errors import ConfigError, GantrainError
from gantrain.optim import make_optimizer
from gantrain.sampling import interpolation_strip, reconstruction_grid
from gantrain.trainer import Trainer, resolve_device

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
log = logging.getLogger("gantrain")

register()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python -m gantrain OVERRIDES...`` would run, via Hydra's Compose API (tests, scripts)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def build(cfg: DictConfig, run_dir: str | Path) -> Trainer:
    """Instantiate model, objective, optimizers, data and Trainer from a composed config."""
    seed_everything(cfg.seed)
    settings = instantiate(cfg.trainer)
    device = resolve_device(settings.device)
    model = instantiate(cfg.model).to(device)  # device placement happens here and only here
    objective = instantiate(cfg.loss).to(device)  # fixed networks inside terms (VGG) move too
    optimizers, extras = {}, {}
    networks = getattr(objective, "networks", tuple(cfg.optim))
    missing = [n for n in networks if n not in cfg.optim]
    if missing:
        raise ConfigError(f"optim: {type(objective).__name__} trains {list(networks)} but optim has no {missing}")
    unused = [n for n in cfg.optim if n not in networks]
    if unused:
        log.info("optim.%s: not used, %s trains only %s", "/".join(unused), type(objective).__name__, list(networks))
    for name in networks:  # optim.<network>: a torch.optim partial plus our per-network keys
        node = OmegaConf.to_container(cfg.optim[name], resolve=True)
        extras[name] = {key: node.pop(key) for key in OPTIM_EXTRA_KEYS if key in node}
        lookahead = extras[name].get("lookahead") or {}
        optimizers[name] = keyed(
            f"optim.{name}",
            make_optimizer,
            instantiate(node, _convert_="all"),
            getattr(model, name).parameters(),
            device=device,
            implementation=extras[name].get("implementation", "auto"),
            lookahead_k=lookahead.get("k", 0),
            lookahead_alpha=lookahead.get("alpha", 0.5),
        )
    phases = objective.phases(model, optimizers, n_critic=settings.n_critic)
    for phase in phases:  # the per-network schedule and clipping go to the phase that steps that optimizer
        name = next(n for n, opt in optimizers.items() if opt is phase.optimizer)
        if extras[name].get("schedule") is not None:
            phase.schedule = keyed(f"optim.{name}", instantiate, extras[name]["schedule"])
        phase.gradient_clip_val = extras[name].get("gradient_clip_val")
        phase.gradient_clip_algorithm = extras[name].get("gradient_clip_algorithm")
    data = instantiate(cfg.data)
    stream = data.stream(seed=cfg.seed, device=device)
    # Fixed noise from its own generators: sample grids and evaluation never consume the training RNG.
    fixed_noise = model.noise(settings.num_samples, device, generator=torch.Generator(device).manual_seed(cfg.seed))
    evaluator = None
    if hasattr(data, "evaluate"):
        eval_noise = model.noise(
            data.num_eval_samples, device, generator=torch.Generator(device).manual_seed(cfg.seed + 1)
        )
        evaluator = lambda: data.evaluate(model.sample(eval_noise))
    sampler = lambda: {"samples": data.render(model.sample(fixed_noise))}  # noqa: E731
    if hasattr(model.g, "reconstruct"):  # a VAE: also inputs beside reconstructions, and latent interpolations
        fixed = torch.stack([stream.dataset[i] for i in range(min(16, len(stream.dataset)))]).to(device)
        sampler = partial(_vae_pictures, model, data, fixed_noise, fixed)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return Trainer(
        settings,
        model=model,
        phases=phases,
        data=stream,
        callbacks=Trainer.standard_callbacks(
            settings,
            run_dir,
            sampler=sampler,
            evaluator=evaluator,
            config=resolved,
            compat={"model": resolved["model"], "loss": resolved["loss"]},
        ),
    )


def _vae_pictures(model, data, noise: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
    was_training = model.g.training
    model.g.eval()
    try:
        return {
            "samples": data.render(model.sample(noise)),  # prior samples from the fixed z
            "reconstructions": reconstruction_grid(model.g, fixed),
            "interpolation": interpolation_strip(model.g, fixed[:8]),
        }
    finally:
        model.g.train(was_training)


def keyed(prefix: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with ``prefix.`` in front of the config key a ConfigError names."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        raise ConfigError(f"{prefix}.{err}") from None


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


def user_error(e: BaseException) -> GantrainError | None:
    """The user-input error behind ``e`` (Hydra wraps errors raised while instantiating), if any."""
    while e is not None and not isinstance(e, GantrainError):
        e = e.__cause__ if isinstance(e, InstantiationException) else None
    return e


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise  # a bug: keep the traceback
        log.error("%s", err)  # one line on the console and in the run's log, no traceback
        raise SystemExit(1) from None
    return metrics.get("loss/G", float("nan"))  # a scalar for sweepers


def main() -> None:
    if not CONFIG_DIR.is_dir():
        raise SystemExit(
            f"gantrain: config directory {CONFIG_DIR} not found; install from a clone with `pip install -e .` "
            "(the recipes live in the repository's configs/)"
        )
    _hydra_main()


if __name__ == "__main__":
    main()
