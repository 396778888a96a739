"""The one way user input is checked. Every check raises :class:`ConfigError` with one message format::

    <key>=<value>: must be <what is allowed>[ (<hint>)]

An object checks its *own* arguments and names only them (``weight``, ``encoder.norm``); the entry point puts the
config path in front (``loss.gp.``, see :mod:`gantrain.errors`). Each function returns the checked value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from gantrain.errors import ConfigError


def fail(key: str, value: Any, must: str, hint: str = "") -> None:
    """Raise the standard message: ``key=value: must be MUST (HINT)``."""
    shown = f"'{value}'" if isinstance(value, (str, Path)) else repr(value)
    raise ConfigError(f"{key}={shown}: must be {must}" + (f" ({hint})" if hint else ""), key=key)


def integer(key: str, value: Any, at_least: int | None = None, hint: str = "", at_most: int | None = None) -> int:
    """An ``int`` (not a bool: ``true`` in YAML is a typo, not a 1), optionally ``>= at_least`` and ``<= at_most``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (at_least is None or value >= at_least)
    if not (ok and (at_most is None or value <= at_most)):
        bounds = [f">= {at_least}"] * (at_least is not None) + [f"<= {at_most}"] * (at_most is not None)
        fail(key, value, " ".join(["an integer", " and ".join(bounds)]).strip(), hint)
    return value


def number(
    key: str,
    value: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    hint: str = "",
) -> float:
    """A finite real number within the given bounds (``ge``: >=, ``gt``: >, ``le``: <=, ``lt``: <)."""
    bounds = [(ge, ">="), (gt, ">"), (le, "<="), (lt, "<")]
    must = " and ".join(f"{op} {b:g}" for b, op in bounds if b is not None) or "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and all(
        b is None or {">=": value >= b, ">": value > b, "<=": value <= b, "<": value < b}[op] for b, op in bounds
    )
    if not ok:
        fail(key, value, must, hint)
    return value


def positive(key: str, value: Any, hint: str = "") -> float:
    """A finite number > 0."""
    return number(key, value, gt=0, hint=hint)


def choice(key: str, value: Any, allowed: Iterable[Any], hint: str = "") -> Any:
    """One of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        fail(key, value, "one of " + ", ".join(str(a) for a in allowed), hint)
    return value


def path(key: str, value: Any, kind: str = "any", hint: str = "") -> Path:
    """An existing path (``kind``: ``file``, ``dir`` or ``any``), returned as a ``Path`` with ``~`` expanded."""
    p = Path(str(value)).expanduser()
    exists = {"file": p.is_file, "dir": p.is_dir, "any": p.exists}[kind]()
    if not exists:
        fail(
            key, value, {"file": "an existing file", "dir": "an existing folder", "any": "an existing path"}[kind], hint
        )
    return p
