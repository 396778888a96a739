"""Optimizer building blocks: one network's update rule, LR schedules, Lookahead, and torch's foreach/fused kernels.

Nothing here reads the config. ``optim.<net>`` instantiates a :class:`NetworkOptim` (its sub-nodes: ``optimizer``, a
``_partial_`` torch optimizer; ``schedule``; ``lookahead``; and the clipping keys); the entry point calls
:meth:`NetworkOptim.build` with the network's parameters and hands the resulting :class:`Update` to the objective.

Error messages name the key relative to the network's node (``schedule.kind=...``,
``lookahead.k=...``, ``implementation=...``); the entry point puts ``optim.<net>.`` in front.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from gantrain import checks
from gantrain.errors import ConfigError
from gantrain.settings import check_clipping

log = logging.getLogger(__name__)


@dataclass
class Update:
    """How one network's optimizer steps (``optim.<net>``, see :class:`NetworkOptim`); a phase holds it. ``schedule``
    None: constant LR; clipping None: the trainer's setting (a value of 0: no clipping for it)."""

    optimizer: Optimizer
    schedule: Optional["Schedule"] = None
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None

    def __post_init__(self) -> None:
        check_clipping(self.gradient_clip_val, self.gradient_clip_algorithm)


SCHEDULE_KINDS = ("constant", "step", "cosine", "exponential", "linear")
HORIZON_KINDS = ("cosine", "linear")  # the kinds that end at the horizon, so run differently if max_steps changes
IMPLEMENTATIONS = ("auto", "default", "foreach", "fused")


# ----------------------------------------------------------------------------- LR schedules
def _one(_: int) -> float:
    """The constant LR factor (a module-level function, so LambdaLR state_dicts stay plain)."""
    return 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Schedule:
    """One network's learning-rate schedule, built from torch's own schedulers by :meth:`build`.

    ``kind``:

    * ``constant``: the base LR throughout;
    * ``step``: ``StepLR(step_size, gamma)``, the LR times ``gamma`` every ``step_size`` steps;
    * ``cosine``: ``CosineAnnealingLR`` from the base LR down to ``min_lr`` over the post-warm-up steps;
    * ``exponential``: ``ExponentialLR(gamma)``, the LR times ``gamma`` every step;
    * ``linear``: ``LinearLR`` from the base LR down to zero over the post-warm-up steps.

    ``warmup_steps`` = W > 0 puts a linear warm-up in front of any kind: optimizer step ``i < W`` (0-based) runs at
    ``base_lr * (i + 1) / W``, so step ``W - 1`` runs at the full LR; the main schedule then starts at step W (its step
    ``t = i - W``) with a horizon of ``max(total_steps - W, 1)`` steps. ``min_lr`` is used by ``cosine`` only,
    ``step_size`` by ``step`` only, ``gamma`` by ``step`` and ``exponential`` only.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    step_size: int = 1000
    gamma: float = 0.5
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        checks.choice("kind", self.kind, SCHEDULE_KINDS)
        checks.integer("warmup_steps", self.warmup_steps, at_least=0, hint="0: no warm-up")
        checks.integer("step_size", self.step_size, at_least=1)
        if self.kind in ("step", "exponential"):
            checks.number("gamma", self.gamma, gt=0, le=1, hint=f"kind={self.kind} multiplies the LR by gamma")
        checks.number("min_lr", self.min_lr, ge=0)

    def build(self, optimizer: Optimizer, total_steps: int) -> lrs.LRScheduler:
        """A torch scheduler for ``optimizer``, stepped once after each of its ``total_steps`` steps (LRs: the class
        docstring). Always a scheduler, even ``constant`` without warm-up, so ``step()``/``state_dict()`` work
        uniformly. Past ``total_steps`` torch's own scheduler continues (``cosine`` rises again)."""
        if not _is_int(total_steps) or total_steps < 0:
            raise ValueError(f"Schedule.build: total_steps={total_steps!r} must be an integer >= 0")
        warmup = self.warmup_steps
        if warmup and warmup >= total_steps:
            log.warning(
                "schedule.warmup_steps=%d >= the %d optimizer steps of this network: it never reaches the "
                "end of its warm-up%s",
                warmup,
                total_steps,
                "" if self.kind == "constant" else f" nor runs its {self.kind} schedule",
            )
        if warmup == 0:
            return self._main(optimizer, max(total_steps, 1))
        # Each scheduler's constructor changes the LR once; SequentialLR resets the groups to their
        # ``initial_lr`` and undoes those steps, so the order of construction does not matter.
        if warmup == 1:  # factor (0 + 1) / 1 = 1: a one-step constant phase (LinearLR needs total_iters >= 1)
            ramp: lrs.LRScheduler = lrs.LambdaLR(optimizer, _one)
        else:  # factor 1/W + (1 - 1/W) * i / (W - 1) = (i + 1) / W for i = 0 .. W - 1
            ramp = lrs.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
        main = self._main(optimizer, max(total_steps - warmup, 1))
        return lrs.SequentialLR(optimizer, schedulers=[ramp, main], milestones=[warmup])

    def _main(self, optimizer: Optimizer, horizon: int) -> lrs.LRScheduler:
        """The schedule after warm-up; ``horizon``: the steps it has (cosine and linear end there)."""
        if self.kind == "step":
            return lrs.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
        if self.kind == "cosine":
            return lrs.CosineAnnealingLR(optimizer, T_max=horizon, eta_min=self.min_lr)
        if self.kind == "exponential":
            return lrs.ExponentialLR(optimizer, gamma=self.gamma)
        if self.kind == "linear":
            return lrs.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=horizon)
        return lrs.LambdaLR(optimizer, _one)


# ----------------------------------------------------------------------------- Lookahead
class Lookahead(Optimizer):
    """Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back").

    The wrapped ``base`` optimizer updates the (fast) parameters as usual; every ``k``-th step the slow weights move
    ``alpha`` of the way towards them, ``slow += alpha * (fast - slow)``, and the fast weights restart from there. Slow
    weights start as copies of the parameters at construction.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own objects, so LR schedulers, ``zero_grad``,
    clipping and ``GradScaler`` (ordinary path, also around a fused base) act on the base; a skipped step does not
    count towards ``k``.
    """

    def __init__(self, base: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, Lookahead):
            raise ConfigError("lookahead: the optimizer is already wrapped in Lookahead", key="lookahead")
        checks.integer("lookahead.k", k, at_least=1, hint="steps between slow-weight updates")
        checks.number("lookahead.alpha", alpha, gt=0, le=1, hint="the slow weights' step size")
        self.base = base
        self.k = int(k)
        self.alpha = float(alpha)
        self.counter = 0  # base steps taken; the slow weights move when it reaches a multiple of k
        self._wrapping = True
        # Optimizer.__init__ sets up hooks and the step patching; its groups are then replaced by the base's.
        super().__init__([p for group in base.param_groups for p in group["params"]], {})
        self._wrapping = False
        self._share()
        with torch.no_grad():
            self.slow: list[torch.Tensor] = [p.detach().clone() for p in self._params()]

    def _share(self) -> None:
        """Point our groups, state and defaults at the base's (its load_state_dict replaces them)."""
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer, with slow weights for its parameters."""
        if self._wrapping:  # called by Optimizer.__init__ on the throw-away groups
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        self._share()
        with torch.no_grad():
            self.slow.extend(p.detach().clone() for p in self.base.param_groups[-1]["params"])

    @torch.no_grad()
    def sync(self) -> None:
        """The Lookahead update: ``slow += alpha * (fast - slow)``, then ``fast = slow``."""
        for fast, slow in zip(self._params(), self.slow, strict=True):
            slow.add_(fast - slow, alpha=self.alpha)
            fast.copy_(slow)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One base step; every ``k``-th also the slow-weight update. Returns the closure's loss."""
        loss = self.base.step(closure) if closure is not None else self.base.step()
        self.counter += 1
        if self.counter % self.k == 0:
            self.sync()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"base", "slow", "counter", "k", "alpha"}``; tensors are references (as torch's), not copies."""
        return {
            "base": self.base.state_dict(),
            "slow": list(self.slow),
            "counter": self.counter,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict`'s output; ValueError if it is not from a Lookahead like this one."""
        missing = {"base", "slow", "counter", "k", "alpha"} - set(state_dict)
        if missing:
            raise ValueError(f"not a Lookahead state_dict (no {sorted(missing)}); was Lookahead off when it was saved?")
        if state_dict["k"] != self.k or state_dict["alpha"] != self.alpha:
            raise ValueError(
                f"Lookahead state_dict has k={state_dict['k']}, alpha={state_dict['alpha']}; "
                f"this optimizer has k={self.k}, alpha={self.alpha}"
            )
        slow = state_dict["slow"]
        if len(slow) != len(self.slow):
            raise ValueError(f"Lookahead state_dict has {len(slow)} slow tensors; this optimizer has {len(self.slow)}")
        for i, (mine, saved) in enumerate(zip(self.slow, slow)):
            if mine.shape != saved.shape:
                raise ValueError(
                    f"Lookahead state_dict: slow tensor {i} has shape {tuple(saved.shape)}, "
                    f"the parameter has {tuple(mine.shape)}"
                )
        self.base.load_state_dict(state_dict["base"])
        self._share()
        with torch.no_grad():
            for mine, saved in zip(self.slow, slow):
                mine.copy_(saved)
        self.counter = int(state_dict["counter"])

    def __getstate__(self) -> dict[str, Any]:  # Optimizer's keeps only defaults/state/param_groups
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._share()

    def __repr__(self) -> str:
        base = "\n".join("    " + line for line in repr(self.base).splitlines())
        return f"Lookahead(k={self.k}, alpha={self.alpha}, counter={self.counter},\n{base}\n)"


# ----------------------------------------------------------------------------- implementations
def _accepts(optimizer_cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(optimizer_cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _fused_device_types() -> tuple[str, ...]:
    """Device types torch has fused optimizer kernels for (those that accept ``fused``)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):  # a torch without the helper: CUDA (2.0+) and CPU (2.4+)
        return ("cuda", "cpu")


def _name(optimizer_cls: type) -> str:
    module = optimizer_cls.__module__
    if module.startswith("torch.optim"):
        module = "torch.optim"
    return f"{module}.{optimizer_cls.__qualname__}"


def implementation_kwargs(
    optimizer_cls: type, device: torch.device | str, implementation: str = "auto", *, key: str = "implementation"
) -> dict[str, bool]:
    """The ``foreach``/``fused`` keyword arguments that select ``implementation`` of ``optimizer_cls``.

    * ``auto``: on CUDA ``{"fused": True}`` where the class has a fused implementation (Adam, AdamW, SGD, Adagrad), else
      ``{"foreach": True}`` where it has a foreach one, else ``{}``; on other devices ``{}`` (torch's default);
    * ``default``: ``{}``;
    * ``foreach`` / ``fused``: that flag; ConfigError if the class or (``fused``) the device has none.

    ``key`` is the config key named in error messages.
    """
    device = torch.device(device)
    checks.choice(key, implementation, IMPLEMENTATIONS)
    has = {flag: _accepts(optimizer_cls, flag) for flag in ("foreach", "fused")}
    if implementation == "default":
        return {}
    if implementation == "auto":
        if device.type != "cuda":
            return {}
        if has["fused"] and "cuda" in _fused_device_types():
            return {"fused": True}
        return {"foreach": True} if has["foreach"] else {}
    if not has[implementation]:
        allowed = ["auto", "default"] + [flag for flag in ("foreach", "fused") if has[flag]]
        raise ConfigError(
            f"{key}={implementation}: {_name(optimizer_cls)} has no {implementation} implementation; "
            f"allowed here: {', '.join(allowed)}",
            key=key,
        )
    if implementation == "fused" and device.type not in _fused_device_types():
        raise ConfigError(
            f"{key}=fused: this torch has no fused optimizer kernels for device {device.type!r} "
            f"(it has them for {', '.join(_fused_device_types())}); use auto, default or foreach",
            key=key,
        )
    return {implementation: True}


def make_optimizer(
    factory: Callable[..., Optimizer],
    params: Iterable[Any],
    *,
    device: torch.device | str,
    implementation: str = "auto",
    **kwargs: Any,
) -> Optimizer:
    """``factory(params, **kwargs, **implementation_kwargs(...))``; ``factory``: a ``torch.optim`` class or a
    ``functools.partial`` of one (Hydra's ``_partial_: true``). Lookahead is :func:`lookahead`'s job."""
    optimizer_cls = factory.func if isinstance(factory, functools.partial) else factory
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise ConfigError(
            f"optimizer._target_: {optimizer_cls!r} is not a torch.optim.Optimizer class", key="optimizer._target_"
        )
    betas = getattr(factory, "keywords", {}).get("betas")
    if betas is not None and not _two_numbers(betas):  # torch would index betas[1] and fail with an IndexError
        checks.fail("optimizer.betas", _plain(betas), "two numbers [beta1, beta2], each in [0, 1)", "e.g. [0.5, 0.999]")
    flags = implementation_kwargs(optimizer_cls, device, implementation)
    try:
        return factory(params, **kwargs, **flags)
    except ValueError as e:  # torch checks its own arguments: "Invalid beta parameter at index 1: 2.0"
        raise ConfigError(f"optimizer: {_name(optimizer_cls)} refuses its arguments: {e}", key="optimizer") from None
    except TypeError as e:  # a misspelled argument of an optimizer given by _target_ (no schema checked its keys)
        from gantrain.hydra_errors import not_an_argument  # the model/loss message; Hydra only on this path

        err = not_an_argument(_name(optimizer_cls), e)
        if err is None:
            raise
        raise err.within("optimizer") from None


def _plain(value: Any) -> Any:
    """A config list as a Python list, for messages."""
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str) else value


def _two_numbers(value: Any) -> bool:
    items = _plain(value)
    return isinstance(items, list) and len(items) == 2 and all(isinstance(b, (int, float)) for b in items)


def lookahead(base: Optimizer, k: int = 0, alpha: float = 0.5) -> Optimizer:
    """``optim.<net>.lookahead``: ``base`` wrapped in :class:`Lookahead` (Zhang et al. use k=5), or ``base`` at k=0."""
    checks.integer("lookahead.k", k, at_least=0, hint="0: no Lookahead")
    return Lookahead(base, k=k, alpha=alpha) if k > 0 else base


class NetworkOptim:
    """``optim.<net>``: everything about how one network is updated.

    Args:
        optimizer: a ``torch.optim`` class or a ``functools.partial`` of one (Hydra's ``_partial_``),
            without parameters and learning rate.
        lr: the base learning rate (what ``schedule`` scales).
        schedule: the LR schedule, stepped once per optimizer step; lookahead: :func:`lookahead` (``k=0``: none).
        gradient_clip_val: None: the trainer's ``gradient_clip_val``; 0: no clipping for this network.
        gradient_clip_algorithm: None: the trainer's; ``norm`` | ``value``.
        implementation: ``auto`` | ``default`` | ``foreach`` | ``fused`` (:func:`implementation_kwargs`).
    """

    def __init__(
        self,
        optimizer: Callable[..., Optimizer],
        lr: float,
        schedule: Schedule = Schedule(),
        lookahead: Callable[[Optimizer], Optimizer] = lookahead,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
        implementation: str = "auto",
    ):
        checks.positive("lr", lr)
        self.optimizer, self.lr, self.schedule, self.lookahead = optimizer, lr, schedule, lookahead
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.implementation = implementation

    def build(self, params: Iterable[Any], device: torch.device | str) -> Update:
        """The network's :class:`Update`: optimizer (with Lookahead), schedule, clipping."""
        base = make_optimizer(self.optimizer, params, device=device, implementation=self.implementation, lr=self.lr)
        return Update(self.lookahead(base), self.schedule, self.gradient_clip_val, self.gradient_clip_algorithm)
