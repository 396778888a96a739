"""Speed switches that leave what a run computes alone: ``trainer.compile``, ``trainer.channels_last`` and
``trainer.matmul_precision`` (plus cuDNN's benchmark mode on CUDA), applied once by :func:`apply` after the
networks are built and on the device.

* compile: each trained network is compiled in place (``nn.Module.compile``), so its ``state_dict`` keys are
  those of the eager network and checkpoints load with the switch on or off. The losses stay eager: they read
  Python state (the step, the stats sink) that changes every step. A network that a phase's loss takes a double
  backward through (gradient penalty, R1: the objective declares them, ``double_backward_networks()``) stays
  eager: torch.compile's autograd does not support double backward (on the torch this was written with it
  raises; an open PyTorch report has WGAN-GP silently losing the penalty's gradient). A network with spectral
  norm stays eager too: its power iteration updates buffers in place that the compiled backward has saved.
* channels_last: the networks' 4-D weights and every 4-D batch the Trainer draws in NHWC memory format (the
  layout tensor-core convolutions want); 2-D points and MLP weights are untouched. With both switches on a GPU, a
  network with a transposed convolution stays eager: inductor's compiled backward of ``ConvTranspose2d`` in
  channels_last fails its stride check there (pytorch/pytorch#171622; seen on an H200, torch 2.11, in dcgan's G and
  the hand loop's alike), while the CPU compiles it.
* matmul_precision: :func:`torch.set_float32_matmul_precision` (``high``/``medium``: TF32/bf16 internal matmuls
  on NVIDIA GPUs; it changes float results, so a resumed run keeps it).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm  # gantrain's spectral norm (models.layers)

from gantrain.errors import ConfigError

log = logging.getLogger("gantrain")


def compile_mode(value: bool | str) -> str | None:
    """The torch.compile mode of a ``trainer.compile`` value; None: off."""
    return None if value is False else "default" if value is True else value


def apply(settings, model: nn.Module, objective: Any, stream: Any, device: torch.device) -> Any:
    """Apply ``settings``' speed switches to the built ``model`` (on ``device``); returns the batch stream the
    Trainer should draw from (``stream`` itself unless batches change memory format)."""
    torch.set_float32_matmul_precision(settings.matmul_precision)  # set every build: a global of the process
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes every step: the fastest kernel, once
    nets = dict(model.named_children())  # the model's networks (build() checked the objective's are among them)
    trained = [nets[n] for n in objective.networks if n in nets]
    if settings.channels_last:
        for net in trained:
            net.to(memory_format=torch.channels_last)  # 4-D weights only; the Parameter objects stay (optimizers)
        stream = ChannelsLastStream(stream)
    mode = compile_mode(settings.compile)
    if mode is not None:
        transposed_eager = settings.channels_last and device.type in ("cuda", "mps")
        compile_networks(model, objective, mode, transposed_eager=transposed_eager)
    return stream


@runtime_checkable
class DeclaresDoubleBackward(Protocol):
    def double_backward_networks(self) -> dict[str, tuple[str, ...]]:
        """The networks a loss takes a double backward through, each with the names of those terms."""


def compile_networks(model: nn.Module, objective: Any, mode: str, transposed_eager: bool = False) -> list[str]:
    """Compile every network ``objective`` trains in place, but those a loss takes a double backward through, those
    with spectral norm and, with ``transposed_eager`` (channels_last on a GPU), those with a transposed convolution
    (one log line each says which and why); returns the names of the compiled ones."""
    if not isinstance(objective, DeclaresDoubleBackward):  # a user's own objective: unknown is not the same as none
        raise ConfigError(
            f"trainer.compile: {type(objective).__name__} does not declare double_backward_networks() (the networks "
            "its losses take input gradients through, which must stay eager); add it, or set trainer.compile=false"
        )
    eager = objective.double_backward_networks()
    # dynamo caches graphs per forward code object: each variant of a network (frozen, no_grad for the sample grid,
    # eval) and every instance of its class count against one recompile limit (8), past which it silently runs eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled, nets = [], dict(model.named_children())
    for name in [n for n in objective.networks if n in nets]:
        net = nets[name]
        if name in eager:
            terms = " and ".join(f"loss.{t}" for t in eager[name])
            takes = "takes" if len(eager[name]) == 1 else "take"
            log.info(
                "trainer.compile: %s stays eager: %s %s a double backward through it, which torch.compile does not "
                "support",
                name,
                terms,
                takes,
            )
            continue
        if any(isinstance(m, _SpectralNorm) for m in net.modules()):
            log.info(
                "trainer.compile: %s stays eager: its spectral norm updates its power-iteration vectors in place in "
                "the forward, which a compiled backward finds modified (one of the variables needed for gradient "
                "computation has been modified by an inplace operation)",
                name,
            )
            continue
        if transposed_eager and any(isinstance(m, nn.ConvTranspose2d) for m in net.modules()):
            log.info(
                "trainer.compile: %s stays eager: with trainer.channels_last on a GPU, the compiled backward of its "
                "transposed convolutions fails inductor's stride check (pytorch/pytorch#171622)",
                name,
            )
            continue
        # a network whose loss calls other methods than forward (a VAE: encode/decode) names the parts to compile
        for part in [getattr(net, p) for p in getattr(net, "compile_parts", ())] or [net]:
            part.compile(mode=mode)  # in place: state_dict keys unchanged, compiled at its first call
        compiled.append(name)
    return compiled


def channels_last(batch: Any) -> Any:
    """A 4-D image batch in channels-last memory format; anything else (2-D points) as it is. ``batch``: a tensor
    or an object with the images as ``.x`` (then changed in place and returned)."""
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    batch.x = channels_last(batch.x)
    return batch


class ChannelsLastStream:
    """The Trainer's batch stream with each batch in channels-last format; everything else (``state_dict``,
    ``in_memory``, ``dataset``, ...) is the wrapped stream's."""

    def __init__(self, stream: Any):
        self.stream = stream

    def __iter__(self) -> "ChannelsLastStream":
        return self

    def __next__(self) -> Any:
        return channels_last(next(self.stream))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["stream"], name)
