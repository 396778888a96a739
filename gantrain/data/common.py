"""What every data module shares: what a `data=` option declares, its error type and the one seeding scheme."""

from __future__ import annotations

import hashlib

from gantrain import checks
from gantrain.errors import GantrainError


class DataOption:
    """What every `data=` option declares (a user's own subclasses this); the build reads these, it never probes.
    Every option has ``batch_size``, ``stream(seed, device, rank=0, world_size=1)``, ``render``, ``to_data_units``.

    ``images``: its samples are images, so FID/KID/PR apply (they read ``reference_images()``);
    ``channels``/``resolution`` (images) or ``dim`` (vectors): the sample shape a model must be built for;
    ``holdout``: images ``heldout()`` returns (a VAE's held-out ELBO); ``metric_tags``: what its own
    ``evaluate(samples)`` reports on ``num_eval_samples`` generated samples (none: it has no metric of its own);
    ``num_classes``: the class labels its batches carry (0: none, every ``Batch.y`` is None).
    """

    images = False
    num_classes = 0
    channels: int | None = None
    resolution: int | None = None
    dim: int | None = None
    holdout = 0
    metric_tags: tuple[str, ...] = ()
    num_eval_samples = 0

    def reference_images(self, native: bool = False):
        """(images, their classes or None) FID/KID/PR compare samples with: ``training_dataset()`` and
        ``training_labels()`` unless the option says otherwise (`ImageData`: all of them, whatever ``limit``).
        ``native`` (``metrics.reference_resolution=native``): the same images at their own size, not resized to the
        model's; an option that cannot give them says so in one line (`ImageData.native_dataset`)."""
        if native:
            refuse_native(type(self).__name__, "does not say what its images' own size is")
        return self.training_dataset(), self.training_labels()


def refuse_native(what: str, why: str) -> None:
    """The one line that refuses ``metrics.reference_resolution=native`` for data ``what`` (``why``: the reason)."""
    checks.fail("reference_resolution", "native", "model", f"{what} {why}")


class DataError(GantrainError):
    """A problem with data on disk or in a checkpoint: the message names the file or state and what was wrong."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit generator seed that is a pure function of `parts`, e.g. ``("order", seed, epoch)``. The blake2b digest
    of their text: distinct tuples give unrelated seeds (no `seed + k` overlaps), the same in every process, platform
    and Python version (unlike `hash()`). Every seeded generator in gantrain.data uses it."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
