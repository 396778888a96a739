"""Image `data=` options: the `ImageData` base (checks, holdout, binarization, the stream) and `Digits`.

Every dataset here yields float32 image tensors of shape (C, R, R) scaled to [-1, 1]; its `labels`, if any, are
their (N,) int64 classes. `ImageData` subclasses only describe *what* to load; `BatchStream` alone decides the order.
"""

from __future__ import annotations

import abc

import torch
from torch.utils.data import Dataset, Subset

from gantrain import checks
from gantrain.data.binarization import MODES, static_binarized
from gantrain.data.common import DataOption, refuse_native
from gantrain.data.stream import BatchStream, TensorImages, stack


class _StaticallyBinarized(Dataset):
    """Item i of `dataset`, binarized with the fixed per-item seed of `static_binarized`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return static_binarized(self.dataset[index][None], index)[0]


def _images_between(dataset: Dataset, start: int, stop: int, *, binarized: bool) -> Dataset:
    """Items start..stop-1 of `dataset`, statically binarized if asked; tensors stay `TensorImages`."""
    if isinstance(dataset, TensorImages):
        images = dataset.images[start:stop]
        return TensorImages(static_binarized(images, start) if binarized else images)
    if binarized:
        dataset = _StaticallyBinarized(dataset)
    if (start, stop) != (0, len(dataset)):
        dataset = Subset(dataset, range(start, stop))
    return dataset


def limited(labels: torch.Tensor | None, limit: int) -> torch.Tensor:
    """The (limit,) indices, in dataset order, of the images `data.limit` trains on, among the items `labels` (N,)
    describes (or the first N items, unlabelled). Unlabelled: the first `limit`. Labelled, class-balanced: round r takes
    the r-th image of each class (classes in label order) until `limit` are taken, so each class gives its first images
    and the classes' counts differ by at most one (the lower labels get the extra), unless a class runs out."""
    if labels is None:
        return torch.arange(limit)
    order = torch.sort(labels, stable=True).indices  # by class, dataset order within a class
    counts = torch.bincount(labels)
    rank = torch.arange(len(labels)) - (counts.cumsum(0) - counts)[labels[order]]  # each image's place in its class
    rounds = torch.sort(rank * len(counts) + labels[order], stable=True).indices  # round by round, class by class
    return order[rounds[:limit]].sort().values


class ImageData(DataOption, abc.ABC):
    """Base for every image `data=` option: how to build the dataset, plus loader settings.

    Args:
        batch_size: images per batch (per process under DDP), >= 1.
        channels: 1 (grey) or 3 (RGB); images are converted to this.
        resolution: output side length R (images are R x R), >= 4.
        num_workers: DataLoader worker processes, >= 0.
        in_memory: stack the whole dataset into one tensor on the training device (fast for small datasets)
            instead of decoding batches on the fly.
        binarize: "none", "static" (once, with `STATIC_SEED`: the same in every run) or "dynamic" (every batch afresh,
            reproducibly: `BatchStream`) stochastic binarization to -1 or +1 (`binarize`).
        holdout: the last `holdout` images (in file order) are held out for evaluation: the training stream never
            sees them and `heldout()` returns them.
        limit: train on this many of the other images only (0: all of them): the first `limit` in dataset order, or
            where the data has labels the first images of each class, class-balanced (`limited`). FID/KID/PR still
            compare with all of them (`reference_images`).
    """

    images = True

    def __init__(
        self,
        *,
        batch_size: int = 64,
        channels: int,
        resolution: int,
        num_workers: int = 0,
        in_memory: bool = True,
        binarize: str = "none",
        holdout: int = 0,
        limit: int = 0,
    ):
        self.batch_size = checks.integer("batch_size", batch_size, at_least=1)
        self.channels = checks.choice("channels", checks.integer("channels", channels), (1, 3), "1: grey, 3: RGB")
        self.resolution = checks.integer("resolution", resolution, at_least=4)
        self.num_workers = checks.integer("num_workers", num_workers, at_least=0)
        self.in_memory = bool(in_memory)
        self.binarize = checks.choice("binarize", binarize, MODES)
        self.holdout = checks.integer("holdout", holdout, at_least=0)
        self.limit = checks.integer("limit", limit, at_least=0, hint="0: every image")
        self._built: tuple[Dataset, int] | None = None  # (dataset(), images before the holdout), built once
        self._picked: torch.Tensor | None = None  # the indices data.limit trains on

    def to_data_units(self, samples: torch.Tensor) -> torch.Tensor:
        """Model output -> what leaves gantrain: images keep their documented range [-1, 1]."""
        return samples

    @abc.abstractmethod
    def dataset(self) -> Dataset:
        """Build the whole dataset (held-out images included, not binarized); items are (C, R, R)
        float32 tensors in [-1, 1]; its `labels` attribute, if any, their (N,) int64 classes."""

    def _split(self) -> tuple[Dataset, int]:
        """(the whole dataset, number of training images), built and checked on first use."""
        if self._built is None:
            full = self.dataset()
            n = len(full)
            if self.holdout and n - self.holdout < self.batch_size:
                left = f"leaves {max(n - self.holdout, 0)} of the dataset's {n} images for training"
                must = f"at most {max(n - self.batch_size, 0)}"
                checks.fail("holdout", self.holdout, must, f"{left}, less than one batch of {self.batch_size}")
            if self.limit > n - self.holdout:
                held = f", {self.holdout} of them held out" if self.holdout else ""
                checks.fail("limit", self.limit, f"at most {n - self.holdout}", f"the data has {n} images{held}")
            if 0 < self.limit < self.batch_size:
                checks.fail("limit", self.limit, f">= batch_size={self.batch_size}", "0: every image")
            self._built = (full, n - self.holdout)
            if self.limit:
                self._picked = limited(self._labels(), self.limit)
        return self._built

    @property
    def training_size(self) -> int:
        """How many images the training stream draws from: `limit`, else the dataset's size minus `holdout`."""
        n_train = self._split()[1]
        return self.limit or n_train

    def training_indices(self) -> torch.Tensor | None:
        """The (training_size,) indices into `dataset()` of `training_dataset()`'s images; None: the first
        `training_size` (no `limit`)."""
        self._split()
        return self._picked

    def training_dataset(self) -> Dataset:
        """The images the stream trains on (`training_indices`), statically binarized if binarize="static"
        (binarize="dynamic" is applied per batch by the stream)."""
        full, n_train = self._split()
        images = _images_between(full, 0, n_train, binarized=self.binarize == "static")
        if self._picked is None:
            return images
        if isinstance(images, TensorImages):
            return TensorImages(images.images[self._picked])
        return Subset(images, self._picked.tolist())

    def training_labels(self) -> torch.Tensor | None:
        """The (training_size,) int64 classes of `training_dataset()`'s images, None when the data has none."""
        labels = self._labels()
        return labels if labels is None or self._picked is None else labels[self._picked]

    def _labels(self) -> torch.Tensor | None:
        """The classes of every image before the holdout, None when the data has none."""
        full, n_train = self._split()
        labels = getattr(full, "labels", None)  # a user's own dataset() may return any Dataset
        return None if labels is None else labels[:n_train]

    def reference_images(self, native: bool = False) -> tuple[Dataset, torch.Tensor | None]:
        """What FID/KID/PR compare samples with: every image before the holdout, whatever `limit` (statically
        binarized as the training images), and their classes or None. ``native``: the same images at their own size
        (`native_dataset`), everything else as in training (channels, binarization)."""
        full, n_train = self._split()
        if native:
            full = self.native_dataset()
            if full is None:
                refuse_native(type(self).__name__, "cannot load its images at their own size (no native_dataset())")
        return _images_between(full, 0, n_train, binarized=self.binarize == "static"), self._labels()

    def native_dataset(self) -> Dataset | None:
        """`dataset()`'s images, in the same order, at their own size (not resized to `resolution`): what
        ``metrics.reference_resolution=native`` compares with; every item the same size. None: the option cannot."""
        return None

    def heldout(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The last `holdout` images of the dataset, in order, as one (N, C, R, R) float32 tensor. Binarized ("static"
        or "dynamic") with the fixed static seed: bit for bit the same whatever the run's seed."""
        if self.holdout == 0:
            checks.fail("holdout", 0, ">= 1 for held-out images", "train with data.holdout=N")
        full, n_train = self._split()
        held = _images_between(full, n_train, len(full), binarized=self.binarize != "none")
        return stack(held, torch.device(device), self.num_workers, seed=0)

    def heldout_labels(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The (holdout,) int64 classes of `heldout()`'s images (a conditional VAE's held-out ELBO), None when the
        data has none."""
        full, n_train = self._split()
        labels = getattr(full, "labels", None)
        return None if labels is None else labels[n_train:].to(device)

    def stream(self, seed: int, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> BatchStream:
        """The endless, resumable batch stream the Trainer draws from (training images only); under DDP this
        rank's shard of each batch."""
        return BatchStream(
            self.training_dataset(),
            self.batch_size,
            seed=seed,
            device=device,
            num_workers=self.num_workers,
            in_memory=self.in_memory,
            binarize=self.binarize == "dynamic",
            rank=rank,
            world_size=world_size,
            labels=self.training_labels(),
        )

    def render(self, samples: torch.Tensor, per_row: int | None = None) -> torch.Tensor:
        """Generated images ``(N, C, R, R)`` in [-1, 1] -> the sample grid ``(3, H, W)`` in [0, 1], ``per_row`` images
        per row (None: ``ceil(sqrt(N))``; a conditional model's grid: one row per class)."""
        from gantrain.pictures import sample_grid

        return sample_grid(samples.float().cpu(), per_row)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Digits(ImageData):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no network), upsampled to `resolution`. Pixels
    0..16 -> [0, 1], resized (bilinear, antialiased) to R x R, -> [-1, 1]; `channels=3` repeats the grey. Labels: the
    digit 0..9."""

    num_classes = 10

    def dataset(self) -> TensorImages:
        return self._digits(native=False)

    def native_dataset(self) -> TensorImages:
        """The digits at their own 8 x 8 px."""
        return self._digits(native=True)

    def _digits(self, native: bool) -> TensorImages:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
        if not native:
            images = torch.nn.functional.interpolate(
                images,
                size=(self.resolution, self.resolution),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )  # (N, 1, R, R)
        # Bilinear weights are a convex combination; the clamp only absorbs float rounding.
        images = images.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
        if self.channels == 3:
            images = images.repeat(1, 3, 1, 1)  # (N, 3, R, R)
        return TensorImages(images.contiguous(), torch.from_numpy(digits.target).long())
