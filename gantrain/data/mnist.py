"""`TorchvisionImages` (`data=mnist|fashion_mnist|cifar10`) and our own reader of MNIST's IDX files.

torchvision is used only through its public API: its dataset classes download missing files
(and hold CIFAR-10), and its transforms. MNIST-family files already on disk are read here,
in place, so a shared read-only data folder is never written to.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gantrain import checks
from gantrain.data.common import DataError
from gantrain.data.folder import absolute, pil_to_tensor
from gantrain.data.images import ImageData

_IDX_MAGIC = {2049: 1, 2051: 3}  # labels: (n,); images: (n, rows, cols); both unsigned bytes

# name -> the torchvision dataset class (and folder) name; torchvision is imported only when a download
# or a transform needs it (it takes ~1.5 s to import, which every command-line error would pay).
_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _torchvision_dataset(name: str):
    from torchvision import datasets

    return getattr(datasets, _CLASSES[name])


# name -> channels the files hold; decides whether a grey/RGB conversion is needed.
_NATIVE_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3}


def read_idx(path: str | os.PathLike, magic: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not, as a uint8 tensor; read-only. Header: big-endian
    int32 `magic` (2049 labels, 2051 images), one int32 per dimension; else a `DataError`."""
    path = str(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; EOFError: truncated archive
        raise DataError(f"could not read the IDX file '{path}' ({type(e).__name__}: {e})") from None
    ndim = _IDX_MAGIC[magic]
    header = 4 * (1 + ndim)
    got = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if got != magic or len(data) < header:
        raise DataError(f"'{path}' is not an IDX file of {ndim}-d unsigned bytes (magic {got}, expected {magic})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise DataError(
            f"'{path}' holds {len(data) - header} bytes of data but its header says {'x'.join(map(str, dims))}; "
            f"the file is truncated or corrupt"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def idx_files(root: str | os.PathLike, folder: str, split: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX files of `split` ("train" or "t10k"), or None if no folder holds both. Looks in
    torchvision's `<root>/<folder>/raw`, then `<root>/raw`; an unpacked file wins over its `.gz`."""
    for raw in (Path(root, folder, "raw"), Path(root, "raw")):
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            unpacked = raw / f"{split}-{kind}-ubyte"
            packed = raw / f"{unpacked.name}.gz"
            found.append(unpacked if unpacked.is_file() else packed if packed.is_file() else None)
        if None not in found:
            return found[0], found[1]
    return None


class _PilImages(Dataset):
    """(N, H, W) grey or (N, H, W, 3) RGB uint8 images, each made a PIL image for `transform` (as torchvision does);
    `labels`: their (N,) int64 classes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index].numpy()))  # mode "L" or "RGB"


class TorchvisionImages(ImageData):
    """A torchvision dataset (MNIST, Fashion-MNIST, CIFAR-10): images and their 10 classes.

    Args:
        name: "mnist", "fashion_mnist" or "cifar10".
        root: folder holding (or receiving) torchvision's files, relative to the launch directory.
        split: "train" or "test".
        download: let torchvision fetch missing files; failing to find or fetch them raises one `DataError` from
            `dataset()`, pointing to offline alternatives.
        **common: `ImageData` arguments (batch_size, channels, resolution, ...).

    MNIST/Fashion-MNIST need only the split's IDX files (`idx_files`), read in place (nothing written next to them);
    only when no folder holds them does torchvision download (into `<root>/MNIST/raw`). At 28 px nothing is resized:
    pixel byte k becomes k / 127.5 - 1 (to float rounding).
    """

    NAMES = tuple(sorted(_CLASSES))
    SPLITS = ("train", "test")
    num_classes = 10  # each of the three has 10 classes

    def __init__(self, *, name: str, root: str = "./data", split: str = "train", download: bool = True, **common):
        super().__init__(**common)
        self.name = checks.choice("name", name, self.NAMES, "or data=folder data.path=DIR for your own images")
        self.root = str(absolute(root))
        self.split = checks.choice("split", split, self.SPLITS)
        self.download = bool(download)

    def transform(self, native: bool = False):
        """The PIL -> (C, R, R) [-1, 1] transform applied to every image; ``native``: without the resize (28 px
        MNIST/Fashion-MNIST, 32 px CIFAR-10)."""
        from torchvision import transforms

        steps = []
        if self.channels == 1 or _NATIVE_CHANNELS[self.name] == 1:
            # RGB -> grey (ITU-R 601 luma), or grey replicated into 3 equal channels.
            steps.append(transforms.Grayscale(num_output_channels=self.channels))
        steps.append(pil_to_tensor(None if native else self.resolution, self.channels))
        return transforms.Compose(steps)

    def _idx_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's (N, 28, 28) uint8 images and (N,) labels (MNIST family): read in place, else downloaded."""
        folder, train = _CLASSES[self.name], self.split == "train"
        files = idx_files(self.root, folder, "train" if train else "t10k")
        if files is None:  # torchvision downloads all four archives, or raises when download=False
            found = _torchvision_dataset(self.name)(self.root, train=train, download=self.download)
            return found.data, found.targets
        images, labels = read_idx(files[0], 2051), read_idx(files[1], 2049)  # (N, 28, 28), (N,)
        if len(images) != len(labels):
            raise DataError(
                f"{len(images)} images but {len(labels)} labels in '{files[0].parent}': "
                "the files do not belong together"
            )
        return images, labels

    def dataset(self) -> Dataset:
        return self._images(self.transform())

    def native_dataset(self) -> Dataset:
        """The images at the files' own size: 28 px (MNIST, Fashion-MNIST), 32 px (CIFAR-10)."""
        return self._images(self.transform(native=True))

    def _images(self, transform) -> Dataset:
        try:
            if self.name == "cifar10":  # torchvision's public (N, 32, 32, 3) uint8 array and list of N labels
                cifar = _torchvision_dataset("cifar10")(self.root, train=self.split == "train", download=self.download)
                return _PilImages(torch.from_numpy(cifar.data), torch.tensor(cifar.targets), transform)
            return _PilImages(*self._idx_images(), transform)
        except DataError:  # files found but unreadable (read_idx): its message names the file
            raise
        except Exception as e:  # torchvision raises URLError, RuntimeError, OSError, tarfile errors...
            # The boundary to torchvision's download/check code: whatever went wrong, the user
            # needs to know where the files were expected and how to train without them.
            lines = str(e).strip().splitlines()
            reason = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
            if not self.download:
                reason = f"data.download=false; {reason}"
            where = "files there"
            if self.name != "cifar10":
                split = "train" if self.split == "train" else "t10k"
                files = f"{split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz]"
                where = f"{files} there (in {_CLASSES[self.name]}/raw/ or raw/)"
            raise DataError(
                f"data.name={self.name!r} ({self.split} split): the dataset files are missing under "
                f"data.root '{self.root}' and could not be downloaded ({reason}). Put torchvision's "
                f"{where}, or train offline with `data=digits` (bundled, no network) or on your "
                f"own images with `data=folder data.path=DIR`."
            ) from None
