"""Samples from a trained checkpoint: rebuild the model, draw seeded latents, write tensors or images.

``scripts/sample.py`` is the command-line front end; these functions are the testable part::

    model = load_model("outputs/run/checkpoints/last.ckpt", "cpu")
    images = generate(model, 64, seed=0)          # (64, C, H, W) float32 on CPU, in [-1, 1]
    threes = generate(model, 8, labels=3)         # a conditional model: class 3 (labels=[3, 5]: 3, 5, 3, ...)
    write_samples(images, "samples.png")          # .pt tensor | .png grid | anything else: a folder of PNGs
    sample_to(model, "samples/", 10**6)           # any number, in batches (a folder is written as it goes)

The grids and uint8 pixels come from :mod:`gantrain.pictures`, which the training-time pictures use too.
Checkpoints are unpickled with ``weights_only=False`` and their config names the classes to build,
so only sample from checkpoints you trust.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import chain
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from gantrain import checkpoint as ckpt_io
from gantrain import checks
from gantrain.checkpoint import CheckpointError
from gantrain.errors import ConfigError, GantrainError
from gantrain.files import atomic_write
from gantrain.models.generative import GenerativeModel
from gantrain.pictures import sample_grid, to_uint8, unit_to_uint8

log = logging.getLogger(__name__)

OutputKind = Literal["pt", "png", "dir"]
Labels = int | Sequence[int] | None  # the classes of a conditional model's samples, cycled through
PROGRESS_MIN_FILES = 256  # a folder of fewer PNGs is written too fast for a bar to help
NOISE_BLOCK = 4096  # latents drawn at once by generate_batches (a few MB), whatever the number of samples


def output_kind(out: str | Path) -> OutputKind:
    """What ``out`` names: ``"pt"`` (a tensor file), ``"png"`` (one grid image) or ``"dir"`` (one PNG per sample). Only
    the suffixes ``.pt`` and ``.png`` (any case) make a file; every other path is a folder. Raises
    :class:`GantrainError` when ``out`` already exists as the other kind of thing, so a mistake is caught before any
    sampling work is done."""
    out = Path(out)
    kind: OutputKind = {".pt": "pt", ".png": "png"}.get(out.suffix.lower(), "dir")  # type: ignore[assignment]
    if kind == "dir" and out.exists() and not out.is_dir():
        raise GantrainError(f"'{out}' is an existing file; a path without a .pt or .png suffix names a folder")
    if kind != "dir" and out.is_dir():
        raise GantrainError(f"'{out}' is an existing folder, but a {out.suffix} path names a file")
    return kind


def load_model(
    checkpoint_path: str | Path, device: torch.device | str = "cpu", what: str = "checkpoint", ema: bool = True
) -> nn.Module:
    """The model saved in a gantrain training checkpoint, on ``device`` and in eval mode. The model is rebuilt from the
    checkpoint's own resolved ``config["model"]`` (no config files needed). ``ema``: when the run kept an EMA of the
    generator (``trainer.ema``), the generator gets the averaged weights (what the run's grids and evaluation showed);
    ``False`` keeps the raw ones. The run's data option is rebuilt too (no data is loaded), so :func:`generate` hands
    out samples in the data's own units. Raises :class:`CheckpointError` (naming ``what`` and the path) when the file is
    missing, corrupt, not a gantrain checkpoint, or holds a model that cannot draw samples."""
    ckpt = ckpt_io.load(checkpoint_path, what=what)
    try:
        model = instantiate(ckpt["config"]["model"])
    except (KeyError, TypeError, InstantiationException) as e:
        raise CheckpointError(
            f"{what}: cannot rebuild the model saved in '{checkpoint_path}' ({type(e).__name__}: {e})"
        ) from None
    if not (callable(getattr(model, "noise", None)) and callable(getattr(model, "sample", None))):
        raise CheckpointError(
            f"{what}: the model in '{checkpoint_path}' ({type(model).__name__}) has no noise()/sample() to draw with"
        )
    try:
        model.load_state_dict(ckpt["model"])
        if ema and ckpt.get("ema"):
            model.get_submodule(ckpt["ema"]["module"]).load_state_dict(ckpt["ema"]["average"])
    except (KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(
            f"{what}: the weights in '{checkpoint_path}' do not fit its own model config ({e})"
        ) from None
    try:
        model.to_data_units = instantiate(ckpt["config"]["data"]).to_data_units
    except Exception as e:  # e.g. a data option of an older version, or a user's class not importable here
        log.warning("%s: cannot rebuild the run's data option (%s); samples stay in the model's units", what, e)
    return model.to(device).eval()


def generate(
    model: nn.Module,
    num: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    labels: Labels = None,
) -> torch.Tensor:
    """``num`` samples, float32 on CPU, in the data's own units (``model.to_data_units``): images
    ``(num, C, H, W)`` in [-1, 1], 2-D mixture points ``(num, 2)`` in the mixture's coordinates; ``labels``: the
    classes of a conditional model's samples (see :func:`generate_batches`).

    All of :func:`generate_batches` in one tensor (so ``num`` is bounded by memory; a folder of PNGs
    is written batch by batch by :func:`sample_to`).
    """
    out: torch.Tensor | None = None
    start = 0
    batches = generate_batches(model, num, seed, device, batch_size, progress, labels)
    for x in batches:
        if out is None:  # allocate once the image shape is known; no second copy from torch.cat
            out = torch.empty((num, *x.shape[1:]), dtype=torch.float32)
        out[start : start + x.shape[0]] = x
        start += x.shape[0]
    assert out is not None and start == num
    return out


def generate_batches(
    model: nn.Module,
    num: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    labels: Labels = None,
) -> Iterator[torch.Tensor]:
    """:func:`generate`'s samples, ``batch_size`` at a time (the last batch may be smaller), whatever ``num`` is. The
    latents come from one ``torch.Generator`` seeded with ``seed`` on ``device`` (default: where the model's parameters
    are), drawn in blocks of ``NOISE_BLOCK`` samples as decoding needs them: they depend on ``seed`` and ``device``
    only, never on ``batch_size`` or the global RNG (for ``num <= NOISE_BLOCK`` they are
    ``model.noise(num, generator=...)``). So the samples agree across batch sizes up to float rounding (~1e-9 on CPU:
    conv kernels may pick another algorithm per batch size). ``progress``: a tqdm bar when there are several batches
    (quiet off-terminal).

    ``labels`` (a conditional model): a class or a list of classes; sample ``i`` gets ``labels[i % len(labels)]``
    (None: every class in turn, ``i % num_classes``). The noise is the same as without labels. A class given to an
    unconditional model, or out of range: :class:`~gantrain.errors.ConfigError` before anything is sampled."""
    checks.integer("num", num, at_least=1)
    checks.integer("batch_size", batch_size, at_least=1)
    cycle = class_cycle(model, labels)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    blocks = (
        model.noise(min(NOISE_BLOCK, num - start), device, generator=generator) for start in range(0, num, NOISE_BLOCK)
    )
    z = next(blocks)  # (n, *latent_shape): drawn, not yet decoded
    starts = range(0, num, batch_size)
    quiet = None if progress and len(starts) > 1 else True
    for start in tqdm(starts, desc="sampling", unit="batch", dynamic_ncols=True, disable=quiet):
        b = min(batch_size, num - start)
        while z.shape[0] < b:
            z = torch.cat([z, next(blocks)])
        if cycle is None:
            x = model.sample(z[:b])  # (b, C, H, W)
        else:
            x = model.sample(z[:b], cycle[torch.arange(start, start + b) % len(cycle)].to(device))
        yield model.to_data_units(x).float().cpu()
        z = z[b:]


def class_cycle(model: nn.Module, labels: Labels = None, what: str = "labels") -> torch.Tensor | None:
    """The classes a model's samples cycle through (sample ``i``: ``cycle[i % len(cycle)]``): ``labels`` as int64,
    every class ``0..num_classes-1`` for a conditional model without ``labels``, None for an unconditional one.
    :class:`~gantrain.errors.ConfigError` (naming ``what``) for a class it cannot take."""
    if not isinstance(model, GenerativeModel):  # a user's own model with noise()/sample(): no labels
        if labels is None:
            return None
        raise ConfigError(f"{what}: {type(model).__name__} takes no class labels; drop {what}")
    cycle = model.check_labels(labels, what)
    return torch.arange(model.num_classes) if cycle is None and model.conditional else cycle


def sample_to(
    model: nn.Module,
    out: str | Path,
    num: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    labels: Labels = None,
) -> list[Path]:
    """:func:`generate` into :func:`write_samples`'s ``out`` for any ``num``; returns the files written. A folder of
    PNGs is written batch by batch, so ``num`` is bounded by the disk only. A ``.pt`` (one tensor) and a ``.png`` (one
    grid) are checked against what they can hold (memory, free disk, a grid an image viewer opens) after the first
    batch, before the rest is sampled: :class:`GantrainError` if they cannot."""
    out = Path(out)
    kind = output_kind(out)
    # A folder shows the writing bar (one per image); a tensor or grid the sampling bar.
    bar = progress and kind != "dir"
    batches = generate_batches(model, num, seed, device, batch_size, bar, labels)
    first = next(batches)
    _check_output(out, kind, num, tuple(first.shape[1:]), allocating=True)
    if kind == "dir":
        return write_numbered(chain([first], batches), out, num)
    images = torch.empty((num, *first.shape[1:]), dtype=torch.float32)
    start = 0
    for x in chain([first], batches):
        images[start : start + x.shape[0]] = x
        start += x.shape[0]
    return write_samples(images, out, progress=progress)


def existing_outputs(out: str | Path, num: int) -> list[Path]:
    """The files that writing ``num`` samples to ``out`` would replace (what a script refuses without ``--force``)."""
    out = Path(out)
    if output_kind(out) != "dir":
        return [out] if out.exists() else []
    if not out.is_dir():
        return []
    width = _name_width(num)
    return sorted(q for q in out.iterdir() if re.fullmatch(rf"\d{{{width}}}\.png", q.name) and int(q.stem) < num)


def write_samples(images: torch.Tensor, out: str | Path, progress: bool = True) -> list[Path]:
    """Write ``images`` ``(N, C, H, W)`` in [-1, 1] to ``out``; returns the files written.

    * ``*.pt``: ``torch.save`` of the float32 CPU tensor;
    * ``*.png``: one grid (``make_grid``, ``ceil(sqrt(N))`` per row, value range (-1, 1));
    * anything else: a folder (created if needed) with ``000000.png``, ``000001.png``, ... one per
      sample (more digits from a million samples on), greyscale for 1 channel and RGB for 3.

    Every file is written to a temp file beside it, then renamed over the target: a failure never leaves a
    half-written file. Numbered PNGs beyond ``N`` left by an earlier, larger run are kept, with a warning.
    """
    out = Path(out)
    kind = output_kind(out)
    images = images.detach().float().cpu()
    _check_output(out, kind, images.shape[0], tuple(images.shape[1:]), allocating=False)
    if kind == "pt":
        atomic_write(out, lambda f: torch.save(images, f))
        return [out]
    if kind == "png":
        pixels = unit_to_uint8(sample_grid(images)[None])[0]  # (H, W, 3); make_grid turns 1 channel into 3
        atomic_write(out, lambda f: _save_png(pixels, f))
        return [out]
    return write_numbered([images], out, images.shape[0], progress)


def write_numbered(batches: Iterable[torch.Tensor], out: Path, num: int, progress: bool = True) -> list[Path]:
    """The ``num`` images of ``batches`` (each ``(b, C, H, W)`` in [-1, 1]) as ``out/000000.png``, ... (see
    :func:`write_samples`), written as each batch arrives."""
    out.mkdir(parents=True, exist_ok=True)
    width = _name_width(num)
    paths: list[Path] = []
    quiet = None if progress and num >= PROGRESS_MIN_FILES else True
    with tqdm(total=num, desc="writing", unit="img", dynamic_ncols=True, disable=quiet) as bar:
        for batch in batches:
            for p in to_uint8(batch):  # (H, W, C)
                path = out / f"{len(paths):0{width}d}.png"
                # No fsync per file: it would make a folder of many thousand PNGs slow to write.
                atomic_write(path, partial(_save_png, p), fsync=False)
                paths.append(path)
            bar.update(len(batch))
    stale = [q for q in out.iterdir() if re.fullmatch(r"\d{6,}\.png", q.name) and int(q.stem) >= len(paths)]
    if stale:
        log.warning(
            "'%s' still holds %d numbered PNGs from an earlier run beyond the %d written now (%s, ...)",
            out,
            len(stale),
            len(paths),
            min(stale).name,
        )
    return paths


def _name_width(num: int) -> int:
    """Digits of the numbered PNGs: 6, or as many as the last index needs."""
    return max(6, len(str(num - 1)))


def _check_output(out: Path, kind: OutputKind, num: int, shape: tuple[int, ...], allocating: bool) -> None:
    """GantrainError unless ``num`` samples of ``shape`` can be written as ``kind``: images for a PNG output; a .pt that
    fits on the disk and, when it is still to be ``allocating``, in memory; a grid no larger than PIL opens."""
    if kind != "pt" and len(shape) != 3:
        raise GantrainError(
            f"'{out}': these samples have shape {(num, *shape)}, not images (N, C, H, W); write a .pt file "
            "(2-D toy models: the training run's samples/ holds scatter plots)"
        )
    if kind != "pt" and shape[0] not in (1, 3):
        raise GantrainError(
            f"'{out}': PNG output needs 1 or 3 channels, these samples have {shape[0]}; write a .pt file"
        )
    if kind == "pt":
        size = num * math.prod(shape) * 4  # float32
        room = {"memory": _available_memory() if allocating else None, "free disk": _free_disk(out)}
        for what, free in room.items():
            if free is not None and size > free:
                raise GantrainError(
                    f"'{out}': {num} samples of shape {shape} are {size / 1e9:.1f} GB as one float32 tensor, more "
                    f"than the {free / 1e9:.1f} GB of {what} here; lower --num, or write a folder of PNGs (an "
                    "--out without .pt/.png), which is written batch by batch"
                )
    if kind == "png":
        h, w = shape[1] + 2, shape[2] + 2  # make_grid's padding of 2
        per_row = min(math.ceil(math.sqrt(num)), num)
        pixels = (per_row * w + 2) * (math.ceil(num / per_row) * h + 2)
        limit = Image.MAX_IMAGE_PIXELS or math.inf
        if pixels > limit:
            most = int(limit // (h * w))
            raise GantrainError(
                f"'{out}': a grid of {num} samples would have {pixels} pixels, more than PIL opens "
                f"({int(limit)}: about {most} samples of {shape[1]}x{shape[2]}); lower --num, or write a folder "
                "of PNGs (an --out without .pt/.png) or a .pt file"
            )


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _free_disk(out: Path) -> int | None:
    """Free bytes on the file system that will hold ``out`` (its nearest existing folder)."""
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _save_png(pixels: np.ndarray, f: BinaryIO) -> None:
    """``(H, W, 1)`` -> greyscale 'L', ``(H, W, 3)`` -> 'RGB'."""
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(f, format="PNG")
