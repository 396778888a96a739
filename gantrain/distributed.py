"""Data-parallel training: PyTorch's DistributedDataParallel, launched by ``torchrun`` or SLURM (submitit).

In a one-process run :func:`init_from_env` returns the one-rank :data:`SINGLE` group and ``build()`` adds no
wrapper, callback or collective. With ``torchrun --nproc_per_node=N`` (or N SLURM tasks) every process composes
the same config and builds the same model from the same seed. Then:

* each trained network is wrapped once in :class:`~torch.nn.parallel.DistributedDataParallel`, all of its parameters
  trainable at wrap time (DDP hooks only those; as stylegan2-ada-pytorch; the phase loop then toggles ``requires_grad``
  as usual), *with its phase's loss* (:class:`PhaseLoss`): DDP's forward is the whole loss, so every call into the
  network inside it (``encode``/``decode``, a penalty's double backward, a G step through a frozen D) is covered by the
  one wrapper;
* gradients are all-reduced once per optimizer step: every micro-batch but the last runs through
  :meth:`Phase.no_sync_loss <gantrain.phase.Phase>` (DDP's ``no_sync``);
* buffers (BatchNorm, spectral norm) and the EMA's are broadcast from rank 0 after each phase's step;
* each step the global RNGs are seeded from (seed, rank, step), so a resume needs only rank 0's checkpoint; the
  data stream shards by rank (:class:`~gantrain.data.stream.BatchStream`);
* a signal reaching any rank is agreed on by an all-reduce after each step: all stop after the same step, rank 0
  saves, every rank exits with 128 + the signal's number;
* only rank 0 logs, draws sample grids, evaluates (from its fixed noise: metrics do not depend on the rank count)
  and writes checkpoints; the others wait at a barrier after each sample step and at the end (a metric spreading
  sampling over the ranks would gather between them: :meth:`RankBarriers.on_step_end`).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, replace
from datetime import timedelta
from inspect import signature
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gantrain.batch import Batch
from gantrain.data.common import derive_seed
from gantrain.errors import ConfigError, GantrainError
from gantrain.events import Callback
from gantrain.phase import Phase
from gantrain.settings import DDPSettings

log = logging.getLogger(__name__)

# DDP's per-forward buffer broadcast (renamed in newer torch; the old name warns there)
SYNC_BUFFERS = next(
    k for k in ("forward_sync_buffers", "broadcast_buffers") if k in signature(DistributedDataParallel).parameters
)
# A rank waits this long for the others (rank 0 evaluating, saving a checkpoint) before it fails.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Group:
    """This process's place in the data-parallel group; ``world_size`` 1 is a plain one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_all(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (``error``): its own error, or the first failed rank's line (else a
        rank that refused to start would leave the others waiting at their first collective)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        lines: list[Any] = [None] * self.world_size
        dist.all_gather_object(lines, None if error is None else f"{error}")
        if error is not None:
            raise error
        failed = next(((r, line) for r, line in enumerate(lines) if line is not None), None)
        if failed is not None:
            raise RankFailed(f"rank {failed[0]} failed: {failed[1]}")


class RankFailed(GantrainError):
    """Another rank refused to start; it reported why (rank 0 prints its own line)."""


SINGLE = Group()


def init_from_env(device_spec: str = "auto") -> Group:
    """The process group ``torchrun`` or SLURM describes in the environment, initialized (once); else :data:`SINGLE`.
    ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; under SLURM with several
    tasks submitit's ``TorchDistributedEnvironment`` derives them from ``SLURM_PROCID``, ``SLURM_NTASKS``, the node list
    and the job id. gloo for CPU tensors, NCCL for CUDA ones; each rank uses GPU ``LOCAL_RANK``."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if "RANK" not in os.environ and _slurm_tasks() > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ.get("RANK", -1)), int(os.environ.get("LOCAL_RANK", 0))
    if not 0 <= rank < world_size:  # else the group would wait for ranks that never come, silently, for hours
        shown = f"RANK={os.environ['RANK']}" if "RANK" in os.environ else "RANK is not set"
        raise ConfigError(
            f"{shown} with WORLD_SIZE={world_size}: each process needs a RANK from 0 to {world_size - 1}; launch "
            f"with torchrun --nproc_per_node={world_size}, which sets both, or unset WORLD_SIZE for one process"
        )
    cuda = device_spec != "cpu" and not device_spec.startswith("mps") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU (trainer.device=auto or cuda)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=TIMEOUT)
    if rank != 0:  # rank 0 logs; the others say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    return Group(rank, world_size, local_rank)


def current() -> Group:
    """The group this process joined, or :data:`SINGLE` (initializes nothing)."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def shutdown() -> None:
    """Leave the process group, if this process joined one (the end of ``python -m gantrain``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS", os.environ.get("SUBMITIT_LOCAL_NTASKS", 1)) or 1)


def shared_run_dir(group: Group, run_dir: str | Path) -> Path:
    """Rank 0's run directory on every rank. Each rank's Hydra resolved its own (``${now:}``, ``${unique:}``),
    and created it: a rank whose own differs removes it again if it is empty."""
    run_dir = Path(run_dir)
    if not group.distributed:
        return run_dir
    shared = Path(group.broadcast(str(run_dir.resolve())))
    if shared != run_dir.resolve() and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    return shared


class PhaseLoss(nn.Module):
    """A phase's network with its loss as ``forward``: what DDP wraps (see the module docstring). The network is its
    only submodule (a loss that reaches other networks steps them in their own phase)."""

    def __init__(self, network: nn.Module, loss):
        super().__init__()
        self.network = network
        self.loss = loss

    def forward(self, batch: Batch, step: int) -> torch.Tensor:
        return self.loss(batch, step)


class _Unsynced:
    """``ddp(batch, step)`` inside ``ddp.no_sync()`` (DDP decides at forward time whether the backward syncs)."""

    def __init__(self, ddp: DistributedDataParallel):
        self.ddp = ddp

    def __call__(self, batch: Batch, step: int) -> torch.Tensor:
        with self.ddp.no_sync():
            return self.ddp(batch, step)


def replicate(model: nn.Module, phases: Sequence[Phase], settings: DDPSettings, device: torch.device) -> list[Phase]:
    """``phases`` with each network wrapped once in DDP (its loss as the forward); the model is changed in place
    only by SyncBatchNorm (``settings.sync_batchnorm``). Phase ``loss`` is then the DDP module itself."""
    if settings.sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError(
                f"trainer.ddp.sync_batchnorm=true: SyncBatchNorm needs CUDA, this run is on {device.type}; "
                "set trainer.ddp.sync_batchnorm=false (rank 0's BatchNorm statistics are broadcast each step)"
            )
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        phases = [replace(p, module=getattr(model, _child_name(model, p.module))) for p in phases]
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(True)  # DDP hooks only the parameters that are trainable when it wraps
    wrapped = []
    try:
        for phase in phases:
            ddp = DistributedDataParallel(
                PhaseLoss(phase.module, phase.loss),
                **{SYNC_BUFFERS: settings.broadcast_buffers},
                device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
                if device.type == "cuda"
                else None,
                find_unused_parameters=settings.find_unused_parameters,
            )
            wrapped.append(replace(phase, loss=ddp, no_sync_loss=_Unsynced(ddp)))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return wrapped


def _child_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, child in model.named_children() if child is module)


def callbacks(group: Group, seed: int, settings: DDPSettings) -> tuple[Callback, Callback]:
    """(the one that goes first, the one that goes last) among the Trainer's callbacks under DDP."""
    return RankSync(group, settings.find_unused_parameters), RankBarriers(group, seed)


class RankSync(Callback):
    """First callback: each step's stop agreement, the buffer broadcast after each phase, the EMA check before each
    checkpoint; what the signal handlers talk to under DDP (:meth:`request_stop`).

    DDP without ``find_unused_parameters`` silently skips averaging a parameter its phase's loss gives no gradient
    (a loss that is only R1: D's last bias is not in ``grad_x D``); so the run stops with one line naming it."""

    def __init__(self, group: Group, find_unused: bool):
        self.group, self.find_unused = group, find_unused
        self.trainer = None
        self.local_stop = 0  # the signal number this rank received (0: none)
        self.flag = torch.zeros(1, dtype=torch.int64)  # a CPU tensor: the all-reduce goes through gloo
        self.buffers: list[torch.Tensor] = []

    @property
    def step(self) -> int:
        return 0 if self.trainer is None else self.trainer.step

    def request_stop(self, reason: str) -> None:
        """The signal handler's call: noted here, acted on by all ranks after the step all agree on."""
        if not self.local_stop:
            self.local_stop = int(signal.Signals[reason])

    def on_fit_start(self, trainer) -> None:
        self.trainer = trainer
        self.buffers = list(trainer.model.buffers())
        if trainer.ema is not None:
            self.buffers += list(trainer.ema.average.buffers())

    def on_phase_end(self, trainer, phase) -> None:
        if not self.find_unused:
            net = next(name for name, m in trainer.model.named_modules() if m is phase.module)
            unused = next((f"{net}.{n}" for n, p in phase.module.named_parameters() if p.grad is None), None)
            if unused is not None:  # its DDP bucket was never all-reduced: the ranks' weights now differ
                raise ConfigError(
                    f"step {trainer.step + 1}, phase {phase.name}: the loss gave {unused} no gradient (a loss that "
                    "is only a penalty, say), which DDP cannot average unless told; set "
                    "trainer.ddp.find_unused_parameters=true (no checkpoint of this step is written)"
                )
        for buffer in self.buffers:  # BatchNorm running statistics differ per rank after a step on its own data
            dist.broadcast(buffer, src=0)

    def on_step_end(self, trainer) -> None:
        self.flag.fill_(self.local_stop)
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        agreed = int(self.flag.item())
        if agreed and trainer.stop_reason is None:
            trainer.request_stop(signal.Signals(agreed).name)
        if trainer.ema is not None and (trainer.cadence.checkpoints(trainer.step) or agreed):
            self.check_ema(trainer)

    def on_fit_end(self, trainer) -> None:
        if trainer.ema is not None:
            self.check_ema(trainer)

    def check_ema(self, trainer) -> None:
        """Every rank's EMA generator equals rank 0's, bit for bit (else stop before a checkpoint is written)."""
        mine = torch.cat([p.detach().reshape(-1).double().cpu() for p in trainer.ema.average.parameters()])
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        differs = torch.tensor([0 if torch.equal(mine, theirs) else 1 + self.group.rank], dtype=torch.int64)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        if differs.item():
            raise GantrainError(
                f"step {trainer.step}: rank {differs.item() - 1}'s EMA generator differs from rank 0's, so no "
                "checkpoint is written; this is a bug in gantrain's data-parallel training, please report it"
            )


class RankBarriers(Callback):
    """Last callback: seeds each rank's noise from (seed, rank, step) before each step; the other ranks wait
    for rank 0's sample grids and evaluation, and for its final checkpoint, at a barrier."""

    def __init__(self, group: Group, seed: int):
        self.group, self.seed = group, seed

    def reseed(self, step: int) -> None:
        torch.manual_seed(derive_seed("noise", self.seed, self.group.rank, step))  # every CUDA device too

    def on_fit_start(self, trainer) -> None:
        self.reseed(trainer.step)  # after the resume restored the step

    def on_step_end(self, trainer) -> None:
        if trainer.cadence.samples(trainer.step):
            self.group.barrier()  # rank 0 evaluated and drew the grids
        self.reseed(trainer.step)

    def on_fit_end(self, trainer) -> None:
        self.group.barrier()  # rank 0 wrote the last checkpoint and grids: all ranks may exit now
