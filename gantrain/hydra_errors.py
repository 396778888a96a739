"""Hydra's and OmegaConf's errors about a user's config as one :class:`~gantrain.errors.ConfigError` line.

Hydra prints its composition errors over several lines (and the job's OmegaConf errors with a traceback);
:func:`config_error` says the same in gantrain's format, ``key[=value]: what was wrong`` plus what is allowed: the
options of a group, the keys of a node and, for a key that is not there, the same name elsewhere in the config
(``optim.g.betas`` -> ``optim.g.optimizer.betas``). :func:`user_error`, the one way an exception becomes that line (the
entry point, the build, the run's log file and the scripts use it), calls it for every exception that is not already a
:class:`~gantrain.errors.GantrainError`; :func:`within` names the config node an object was built from.
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any

from hydra.errors import (
    CompactHydraException,
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from gantrain.errors import ConfigError, GantrainError
from gantrain.files import FULL, NOT_WRITABLE, write_error

# Cross-group interpolations all link model and data (data.resolution: ${model.resolution},
# model.channels: ${data.channels}), so one that cannot resolve means the two options do not fit.
MODEL_DATA_HINT = (
    "the model and data options do not fit together: 2-D point data (data=ring8, grid25) trains model=mlp, "
    "image data an image model (dcgan, resnet, vae, vae_mlp, vaegan)"
)
TYPE_NAMES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "bool": "true or false"}


def user_error(e: BaseException, node: str = "") -> GantrainError | None:
    """The user-input error behind ``e``, if any, its key put under the config node that raised it. Hydra wraps errors
    raised while instantiating and names the node (``full_key: loss.gp``); ``node`` is the fallback for errors raised
    outside ``instantiate``. Hydra's errors about the command line and config files (an unknown key or option, a value
    of the wrong type) become one line too (:func:`config_error`)."""
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
    target = re.search(r"Error in call to target '([\w.]+)'", str(e))
    return not_an_argument(target.group(1), cause) if target else None


def not_an_argument(target: str, cause: TypeError) -> ConfigError | None:
    """``cause``, a call of ``target`` (a dotted name) with a keyword it does not take, as one line naming the keyword
    and the ones it takes; None for any other TypeError (one inside the target: a bug, keep the traceback). Also for a
    ``_partial_`` target called later (a user's optimizer class: :func:`gantrain.optim.make_optimizer`)."""
    key = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if key is None:
        return None
    try:
        allowed = ", ".join(p for p in inspect.signature(get_object(target)).parameters if p != "self")
    except (ValueError, TypeError, ImportError):
        allowed = "see its signature"
    return ConfigError(f"{key.group(1)}: not an argument of {target}; it takes: {allowed}", key=key.group(1))


def within(node: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a user error it raises names its key under ``node``."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        err = user_error(e, node)
        if err is None:
            raise
        raise err from None


def config_error(e: BaseException, node: str = "") -> ConfigError | None:
    """The user's config mistake behind a Hydra or OmegaConf exception, or None (not one of those: a bug). ``node``: the
    config node being read, named when OmegaConf's error has no ``full_key``."""
    if isinstance(e, OverrideParseException):
        grammar = re.search(r"https://\S+", e.message)
        first = e.message.splitlines()[0]
        return ConfigError(f"{e.override}: not a valid override ({first}; the grammar: {grammar and grammar.group()})")
    if isinstance(e, MissingConfigException):
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        asked = re.match(r"In '([^']+)'", str(e))  # the config whose defaults list names it
        where = f", asked for by {asked.group(1)}" if asked and asked.group(1) != "train" else ""
        if group and e.options:
            options = ", ".join(e.options)
            return ConfigError(f"{group}={name}: must be one of {options} (the options in {group}/{where})")
        return ConfigError(one_line(str(e)))
    if isinstance(e, ConfigCompositionException) and isinstance(e.__cause__, OmegaConfBaseException):
        return omegaconf_error(e.__cause__, composing=True) or ConfigError(one_line(f"{e}: {e.__cause__}"))
    if isinstance(e, CompactHydraException):  # Hydra's own user-facing errors, printed without a traceback
        return ConfigError(one_line(str(e)))
    if isinstance(e, OmegaConfBaseException):
        return omegaconf_error(e, composing=False, node=node)
    return None


def omegaconf_error(e: OmegaConfBaseException, composing: bool, node: str = "") -> ConfigError | None:
    """``composing``: raised while Hydra merged the config files and overrides (so every key
    error is the user's); otherwise raised while the job read the composed config ``node``.
    The message names the full key, so the ConfigError has no relative ``key`` to prefix."""
    key = e.full_key or node
    first = one_line(str(e.msg or e).split("\n    full_key")[0])
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"{key}: has no value and no default; set it, e.g. {key}=...")
    if isinstance(e, InterpolationResolutionError):
        target = re.search(r"\$\{([\w.]+)\}|Interpolation key '([\w.]+)'", first)
        linked = target and (target.group(1) or target.group(2))
        groups = {key.split(".")[0], (linked or "").split(".")[0]}
        return ConfigError(f"{key}: {first}" + (f" ({MODEL_DATA_HINT})" if groups == {"model", "data"} else ""))
    if isinstance(e, ValidationError):
        kind = re.search(r"could not be converted to (\w+)|is not a valid (\w+)", first)
        must = TYPE_NAMES.get(kind.group(1) or kind.group(2)) if kind else None
        return ConfigError(f"{key}={e.value!r}: must be {must}" if must else f"{key}: {first}")
    if composing and isinstance(e, (ConfigAttributeError, ConfigKeyError)) and isinstance(e.parent_node, DictConfig):
        return unknown_key(e.parent_node, str(e.key), key)
    if composing:
        return ConfigError(f"{key}: {first}")
    return None


def unknown_key(parent: DictConfig, name: str, full_key: str) -> ConfigError:
    """``full_key`` is not a key of ``parent``: say which keys are, and where ``name`` is instead."""
    where = full_key.rpartition(".")[0]
    keys = [k for k in parent.keys() if isinstance(k, str) and not k.startswith("_") and k != "hydra"]
    target = parent._get_node("_target_") if "_target_" in parent else None
    what = f"{where} ({target._value()})" if target is not None else where or "the top level"
    close = difflib.get_close_matches(name, keys, n=2, cutoff=0.75)
    if where:
        close = [f"{where}.{k}" for k in close]
    elsewhere = [k for k in same_name(parent._get_root(), name) if k != full_key]
    nearest = max((_shared_parts(k, full_key) for k in elsewhere), default=0)
    # The nearest ones only: optim.d.lr for optim.d.optimizer.lr, not optim.g.lr too.
    elsewhere = [k for k in elsewhere if _shared_parts(k, full_key) == nearest]
    guesses = list(dict.fromkeys(close + elsewhere[:2]))
    hint = f"; did you mean {' or '.join(guesses)}?" if guesses else ""
    return ConfigError(f"{full_key}: no such key{hint} ({what} has: {', '.join(keys)})")


def same_name(node: Any, name: str, prefix: str = "") -> list[str]:
    """The dotted keys under ``node`` whose last part is ``name`` (Hydra's own settings left out)."""
    found: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            if not isinstance(k, str) or (not prefix and k == "hydra"):
                continue
            child = node._get_node(k)
            path = f"{prefix}{k}"
            if k == name:
                found.append(path)
            if isinstance(child, (DictConfig, ListConfig)) and not OmegaConf.is_missing(node, k):
                found += same_name(child, name, path + ".")
    return found


def _shared_parts(a: str, b: str) -> int:
    """How many leading parts two dotted keys share."""
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def one_line(text: str) -> str:
    """Hydra's several lines (tab-indented lists included) joined into one."""
    return " ".join(text.split())
