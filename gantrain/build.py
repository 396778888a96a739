"""Building a run from a composed config: instantiate -> model, objective, updates, phases, data, stream,
evaluators, callbacks -> the :class:`~gantrain.trainer.Trainer`.

With the entry point (:mod:`gantrain.train`, which composes), this is the only code that reads the config
(:func:`gantrain.provenance.hparams_row`, which it calls, reads the overridden keys for the hparams table). What a
part offers is what it declares: the objective its ``networks``, the model its networks, sample shape and
``encodes``, the data option what :class:`~gantrain.data.common.DataOption` lists.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from gantrain import distributed, speed
from gantrain.augment import NoAugment
from gantrain.checkpoint import Checkpointing
from gantrain.errors import ConfigError
from gantrain.hydra_errors import within
from gantrain.metrics.evaluators import LOADING_KEYS, Combined, evaluated_tags, evaluators
from gantrain.metrics.loop import ScoringProtocol, check_monitor
from gantrain.provenance import code_version, command_line, hparams_row
from gantrain.readahead import drawn_ahead
from gantrain.runlog import standard_callbacks
from gantrain.trainer import Trainer, resolve_device

log = logging.getLogger("gantrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass(frozen=True)
class Run:
    """A built run: its trainer, the callback that resumes and saves it, and what a signal handler tells to stop
    (the trainer; under DDP the rank agreement, which stops every rank after the same step)."""

    trainer: Trainer
    checkpoints: Checkpointing
    stopper: Any


def build(cfg: DictConfig, run_dir: str | Path, group: distributed.Group = distributed.SINGLE) -> Trainer:
    """:func:`assemble`'s trainer."""
    return assemble(cfg, run_dir, group).trainer


def assemble(cfg: DictConfig, run_dir: str | Path, group: distributed.Group = distributed.SINGLE) -> Run:
    """Instantiate model, objective, per-network updates, data and Trainer from a composed config.

    Under ``torchrun`` (``group``: this rank's place) every rank builds the same model from the same seed,
    draws its own shard of the data and trains through DDP wrappers (:mod:`gantrain.distributed`).

    The build flows one way: each ``optim.<net>`` node instantiates to a complete
    :class:`~gantrain.optim.NetworkOptim`, the objective turns the model and those updates into
    complete phases, and the objective also says which pictures a run shows.
    """
    OmegaConf.to_container(cfg, resolve=True)  # a ${...} that cannot resolve names its own key, not the node read
    seed_everything(cfg.seed)
    settings = within("trainer", instantiate, cfg.trainer)
    device = resolve_device(settings.device)
    data = within("data", instantiate, cfg.data)
    if cfg.model.get("conditional"):  # the networks are built for the data's classes; the saved config says how many
        with open_dict(cfg):
            cfg.model.num_classes = data.num_classes
    model = within("model", instantiate, cfg.model).to(device)  # device placement happens here and only here
    objective = within("loss", instantiate, cfg.loss).to(device)  # fixed networks inside terms (VGG) move too
    augment = within("augment", instantiate, cfg.augment) if cfg.get("augment") is not None else NoAugment()
    if augment.active and not data.images:
        raise ConfigError(
            f"augment={augment.option}: augments images, and {type(data).__name__} has {data.dim}-D points; "
            "use augment=none"
        )
    objective.use_augment(augment)  # a VAE, which has no D, refuses any but none
    networks = objective.networks
    missing = [n for n in networks if n not in cfg.optim]
    if missing:
        raise ConfigError(f"optim: {type(objective).__name__} trains {list(networks)} but optim has no {missing}")
    nets = dict(model.named_children())  # the model's networks: g, and d unless it is null
    absent = [n for n in networks if n not in nets]
    if absent:
        raise ConfigError(
            f"loss: {type(objective).__name__} trains {list(networks)} but the model has no {absent} "
            f"(model.{absent[0]} is null); pick a model with that network, or a loss for the ones it has"
        )
    unused = [n for n in cfg.optim if n not in networks and n in nets]  # optim.d of a model without D: by design
    if unused:
        log.info("optim.%s: not used, %s trains only %s", "/".join(unused), type(objective).__name__, list(networks))
    build_update = lambda n: instantiate(cfg.optim[n]).build(nets[n].parameters(), device)  # noqa: E731
    updates = {name: within(f"optim.{name}", build_update, name) for name in networks}
    phases = within("loss", objective.phases, model, updates, n_critic=settings.n_critic)
    check_fit(model, data)
    model.to_data_units = data.to_data_units  # what generate() hands out: the data's own units
    # reads the dataset (holdout, batch size); a data option that cannot be split between ranks says so
    stream = within("data", data.stream, seed=cfg.seed, device=device, rank=group.rank, world_size=group.world_size)
    if model.conditional and model.fake_labels == "data":
        model.class_weights = stream.class_counts  # of the whole training set, the same on every rank
    # trainer.compile/channels_last/matmul_precision; before DDP, which keeps the parameters' memory format
    stream = within("trainer", speed.apply, settings, model, objective, stream, device)
    if group.distributed:
        phases = within("trainer.ddp", distributed.replicate, model, phases, settings.ddp, device)
    data_stream, stream = stream, drawn_ahead(stream)  # a stream that reads files reads each step's batches ahead
    # Fixed noise from its own generators: sample grids and evaluation never consume the training RNG.
    fixed_noise = model.noise(settings.num_samples, device, generator=torch.Generator(device).manual_seed(cfg.seed))
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    metrics = None
    if cfg.get("metrics") is not None:
        if not data.images:
            raise ConfigError(f"metrics: FID/KID/PR compare images, and {type(data).__name__} has none; drop metrics=")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # an init draws no training RNG
            metrics = within("metrics", instantiate, cfg.metrics).to(device)
    check_monitor(settings.monitor, evaluated_tags(model, data, metrics))  # before any reference features
    data_key = {k: v for k, v in resolved["data"].items() if k not in LOADING_KEYS}
    evaluation, eval_tags = evaluators(model, data, device, cfg.seed, metrics, data_key, resolved["loss"])
    checkpoints = Checkpointing(
        run_dir, settings.resume, resolved, group.is_main, settings.keep_checkpoints, group.world_size
    )  # fmt: skip
    callbacks = standard_callbacks(
        settings,
        run_dir,
        checkpoints=checkpoints,
        sampler=objective.sampler(model, data.render, fixed_noise, data_stream),
        # rank 0 only; the other ranks wait for it at their next collective (gantrain.distributed)
        evaluator=Combined(evaluation, metrics and metrics.protocol) if evaluation else None,
        eval_tags=eval_tags,
        config=resolved,
        hparams=hparams_row(cfg),
        about={"command": command_line(), "code": code_version()},
        is_main=group.is_main,
        read_ahead=stream if stream is not data_stream else None,
    )
    if metrics is not None:  # how FID/KID/PR are scored, in every checkpoint
        callbacks.append(ScoringProtocol(metrics.protocol, group.is_main))
    first = last = None
    if group.distributed:
        first, last = distributed.callbacks(group, cfg.seed, settings.ddp)
        callbacks = [first, *callbacks, last]
    trainer = Trainer(
        settings,
        model=model,
        phases=phases,
        data=stream,
        callbacks=callbacks,
        world_size=group.world_size,
        state=objective.state_parts(),
    )
    return Run(trainer, checkpoints, first or trainer)


def check_fit(model: Any, data: Any) -> None:
    """The model is built for the data's sample shape (by default the data's resolution and the model's
    channels follow the other; an override of one side alone would fail as a shape error mid-step)."""
    shapes = {"resolution": (model.resolution, data.resolution), "channels": (model.channels, data.channels)}
    for key, (want, have) in shapes.items():
        if want is not None and have is not None and want != have:
            raise ConfigError(
                f"data.{key}={have!r} but model.{key}={want!r}: the model is built for other images; make them "
                "equal (data.resolution follows model.resolution and model.channels data.channels by default)"
            )
    want, have = model.dim, data.dim
    if want is not None and have is not None and want != have:
        raise ConfigError(f"model.dim={want!r}: must be {have}, the size of a sample of {type(data).__name__}")
