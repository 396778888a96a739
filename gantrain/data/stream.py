"""`BatchStream`: the one place that decides the order in which images are seen.

The order is a pure function of (seed, epoch, rank), seeded through `derive_seed`, so a resumed
run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from gantrain import checks
from gantrain.batch import Batch
from gantrain.data.binarization import binarize
from gantrain.data.common import DataError, derive_seed

# A progress bar for the one-off in-memory load is only worth its noise on big datasets.
_PROGRESS_MIN_ITEMS = 5_000


class TensorImages(Dataset):
    """Images already in memory: item i is `images[i]`, a (C, R, R) tensor; `labels`: their (N,) int64 classes or None.
    `BatchStream` and `ImageData.heldout` use the tensor as it is, without a loading pass."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        assert images.dim() == 4, f"expected (N, C, R, R) images, got shape {tuple(images.shape)}"
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def _loader_generator(seed: int) -> torch.Generator:
    # Without an explicit generator, every DataLoader iterator draws its worker base seed from the
    # global torch RNG, which would shift the trainer's random stream.
    return torch.Generator().manual_seed(derive_seed("loader", seed))


def _batches(loader_iter):
    """``loader_iter``'s batches; a worker's DataError keeps its one-line message (PyTorch re-raises it with the
    worker's traceback as message, whose last line is ``module.DataError: <the message>``)."""
    while True:
        try:
            batch = next(loader_iter)
        except StopIteration:
            return
        except DataError as e:
            text = str(e).rstrip()
            if text.startswith("Caught DataError"):
                raise DataError(text.splitlines()[-1].split(": ", 1)[-1]) from None
            raise
        yield batch


def stack(dataset: Dataset, device: torch.device, num_workers: int, seed: int) -> torch.Tensor:
    """Every item of `dataset`, in order, as one (N, C, R, R) tensor on `device`."""
    if isinstance(dataset, TensorImages):
        return dataset.images.to(device)
    from tqdm.auto import tqdm

    n, chunk = len(dataset), 256
    sequential = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    loader = DataLoader(dataset, batch_sampler=sequential, num_workers=num_workers, generator=_loader_generator(seed))
    data = None
    start = 0
    quiet = True if n <= _PROGRESS_MIN_ITEMS else None  # None: also quiet when stderr (the bar's stream) is no tty
    with tqdm(total=n, desc="loading images", unit="img", disable=quiet) as bar:
        for x in _batches(iter(loader)):  # (b, C, R, R)
            if data is None:
                # Preallocated so peak memory is one copy of the dataset, not two.
                data = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=device)
            data[start : start + len(x)].copy_(x)
            start += len(x)
            bar.update(len(x))
    assert start == n, f"loaded {start} of {n} images"
    return data


class _Order:
    """The data order: which dataset indices make up batch `batch` of epoch `epoch` on a rank."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.group = batch_size * world_size  # indices consumed per step by all ranks together
        self.batches_per_epoch = num_items // self.group
        self._perm_epoch, self._perm = -1, None  # cache: permutation of the latest epoch asked
        self._perm_on_device: torch.Tensor | None = None  # ... and its copy on the device last asked for

    def indices(self, epoch: int, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """(batch_size,) int64 dataset indices, on the CPU or on ``device``, where the epoch's permutation is
        copied once: a batch then costs no host-to-device copy, which on a GPU would wait for the device."""
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
            self._perm = torch.randperm(self.num_items, generator=gen)  # (N,)
            self._perm_epoch, self._perm_on_device = epoch, None
        perm = self._perm
        if device is not None and device != perm.device:
            if self._perm_on_device is None or self._perm_on_device.device != device:
                self._perm_on_device = perm.to(device)
            perm = self._perm_on_device
        group = perm[batch * self.group : (batch + 1) * self.group]
        return group[self.rank :: self.world_size]


class _BatchIndices:
    """Endless batch sampler for a DataLoader: index lists from (epoch, batch) onwards. Holds the `_Order`, not the
    stream: a reference cycle would leave workers to the GC (shutdown stalls seconds)."""

    def __init__(self, order: _Order, epoch: int, batch: int):
        self.order, self.epoch, self.batch = order, epoch, batch

    def __iter__(self):
        epoch, batch = self.epoch, self.batch
        while True:
            yield self.order.indices(epoch, batch).tolist()
            batch += 1
            if batch == self.order.batches_per_epoch:
                epoch, batch = epoch + 1, 0


class BatchStream:
    """Endless, resumable stream of image `Batch`es: the one place that decides data order.

    Epoch e visits the dataset in the order `torch.randperm(n, generator=Generator().manual_seed(
    derive_seed("order", seed, e)))`; batch b of the epoch is the b-th consecutive group of
    `batch_size * world_size` indices of that permutation, and the last incomplete group is
    dropped. Under DDP, rank r takes `group[r::world_size]`, so each rank gets exactly
    `batch_size` images, the ranks' batches are disjoint, and together they cover every image at
    most once per epoch. With world_size=1 a batch is simply `perm[b * batch_size:(b + 1) * batch_size]`.

    The stream never draws from the global RNGs, so it cannot perturb a bit-exact resume of the training loop.

    `binarize=True` (data.binarize=dynamic) binarizes every batch afresh on `device` with uniforms from a generator
    there seeded with `derive_seed("binarize/dynamic", seed, epoch, batch, rank)`: resumed streams and both paths
    agree bit for bit. Philox on CUDA (no host work per step) differs from the CPU's: only same-kind devices agree.

    Args:
        dataset: items are (C, R, R) float tensors.
        batch_size: images per batch on this process.
        seed: base seed of the order.
        device: where batches are returned.
        num_workers: DataLoader workers (decoding when streaming; the one-off load when in memory).
        in_memory: stack the dataset on `device` once as `images` and index it, else stream through a DataLoader.
        rank, world_size: this process's place in a data-parallel group.
        binarize: binarize every batch stochastically, afresh each time (images must be in [-1, 1]).
        labels: (N,) int64 class of each item, or None: gathered with the very indices of each batch's images (either
            path, every rank), so they stay aligned without passing through the DataLoader.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        in_memory: bool = True,
        rank: int = 0,
        world_size: int = 1,
        binarize: bool = False,
        labels: torch.Tensor | None = None,
    ):
        checks.integer("batch_size", batch_size, at_least=1)
        checks.integer("num_workers", num_workers, at_least=0)
        assert world_size >= 1 and 0 <= rank < world_size, f"bad rank {rank} of world_size {world_size}"
        n = len(dataset)
        assert labels is None or labels.shape == (n,), f"{n} items but labels of shape {tuple(labels.shape)}"
        if n < batch_size * world_size:
            total = batch_size * world_size
            across = f"; {batch_size} x world_size {world_size} = {total} is more" if world_size > 1 else ""
            checks.fail("batch_size", batch_size, f"at most {n // world_size}", f"the dataset has {n} images{across}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.in_memory = bool(in_memory)
        self.rank = rank
        self.world_size = world_size
        self.binarize = bool(binarize)
        self.num_items = n
        self._order = _Order(n, batch_size, self.seed, rank, world_size)
        self.batches_per_epoch = self._order.batches_per_epoch

        self._epoch = 0
        self._batch = 0  # batches consumed within self._epoch, always < batches_per_epoch
        self._loader_iter = None  # streaming mode: built lazily from the current position
        self._noise: torch.Generator | None = None  # binarize: re-seeded for every batch
        # (N, C, R, R) on `device` when in memory, else None: the whole training set, in dataset order.
        self.images = stack(dataset, self.device, num_workers, self.seed) if self.in_memory else None
        # (N,) beside the images: on `device` when in memory, else on the CPU like the order's indices
        self.labels = None if labels is None else labels.to(self.device if self.in_memory else "cpu")

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        """The next batch on `device`: x (batch_size, C, R, R), y (batch_size,) or None."""
        if self.in_memory:
            index = self._order.indices(self._epoch, self._batch, self.images.device)
            batch = self.images[index]
        else:
            index = self._order.indices(self._epoch, self._batch)  # what the loader's sampler gives for this batch
            if self._loader_iter is None:
                workers = self.num_workers
                loader = DataLoader(
                    self.dataset,
                    batch_sampler=_BatchIndices(self._order, self._epoch, self._batch),
                    num_workers=workers,
                    pin_memory=self.device.type == "cuda",
                    persistent_workers=workers > 0,
                    generator=_loader_generator(self.seed),
                )
                self._loader_iter = _batches(iter(loader))
            batch = next(self._loader_iter).to(self.device, non_blocking=True)
        y = None if self.labels is None else self.labels[index].to(self.device, non_blocking=True)
        if self.binarize:
            if self._noise is None or self._noise.device != batch.device:
                self._noise = torch.Generator(device=batch.device)
            self._noise.manual_seed(derive_seed("binarize/dynamic", self.seed, self._epoch, self._batch, self.rank))
            batch = binarize(batch, self._noise)
        # Count consumption here, not in the sampler: DataLoader workers prefetch ahead.
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return Batch(batch, y)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def class_counts(self) -> torch.Tensor | None:
        """How many training items each class has (float, for ``model.fake_labels=data``); None without labels."""
        return None if self.labels is None else torch.bincount(self.labels.cpu()).float()

    def state_dict(self) -> dict:
        """Position in the stream: `{"epoch": e, "batch": b}`, b batches of epoch e consumed."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batch is the one an uninterrupted stream would give next."""
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"data stream state must be {{'epoch': int, 'batch': int}}, got {state!r}") from None
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise DataError(
                f"data stream state {state!r} does not fit this data: an epoch has "
                f"{self.batches_per_epoch} batches (0 <= batch <= {self.batches_per_epoch}); "
                f"did data.batch_size or the dataset change since the checkpoint?"
            )
        if batch == self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch
        # Drop any prefetched batches; the next __next__ restarts the loader at this position.
        self._loader_iter = None
