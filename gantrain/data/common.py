"""What every data module shares: its error type and the one seeding scheme."""

from __future__ import annotations

import hashlib

from gantrain.errors import GantrainError


class DataError(GantrainError):
    """A problem with data on disk or in a checkpoint: the message names the file or state and what was wrong."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit generator seed that is a pure function of `parts`, e.g. ``("order", seed, epoch)``.

    The blake2b digest of their text, so distinct tuples give unrelated seeds (no `seed + k`
    overlaps between neighbouring runs or epochs) and the value is the same in every process,
    platform and Python version (unlike `hash()`). Every generator in gantrain.data that depends
    on the run's seed is seeded through this function, with a name as the first part.
    """
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
