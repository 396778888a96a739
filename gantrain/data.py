"""Image data for gantrain: dataset recipes (`data=` options) and the one batch stream.

Every dataset here yields float32 image tensors of shape (C, R, R) scaled to [-1, 1] and no
labels. `ImageData` subclasses only describe *what* to load; `BatchStream` alone decides the
order in which images are seen, so that order is a pure function of (seed, epoch) and a resumed
run sees exactly the batches an uninterrupted one would have.

Every `data=` option can also hold out its last `data.holdout` images for evaluation
(`ImageData.heldout()`) and binarize pixels stochastically (`data.binarize`, see `binarize`).
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import os
import struct
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from gantrain.errors import GantrainError

__all__ = [
    "BatchStream",
    "DataError",
    "Digits",
    "ImageData",
    "ImageFolder",
    "TensorImages",
    "TorchvisionImages",
    "binarize",
    "derive_seed",
    "image_files",
    "read_idx",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# A progress bar for the one-off in-memory load is only worth its noise on big datasets.
_PROGRESS_MIN_ITEMS = 5_000

BINARIZE_MODES = ("none", "static", "dynamic")
# The constant behind data.binarize=static and heldout(): every run, whatever its seed, sees the
# same binarized images, so held-out NLLs of different runs are comparable.
STATIC_BINARIZE_SEED = 0


class DataError(GantrainError):
    """A user-facing data problem: the message names the key/path, what was wrong, what is allowed."""


# ----------------------------------------------------------------------------------------------
# Helpers


def _check_int(key: str, value: int, *, minimum: int) -> None:
    # bool is an int subclass; `batch_size: true` in YAML is a typo, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the directory the user launched from.

    Hydra may chdir into the run directory before our objects are built, so a relative
    `data.path=imgs` must be resolved against Hydra's original cwd, not the current one.
    """
    path = Path(path).expanduser()
    from hydra.core.hydra_config import HydraConfig  # local: keep `import gantrain.data` light

    if HydraConfig.initialized():
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(path))).resolve()
    return path.resolve()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit generator seed that is a pure function of `parts`.

    The blake2b digest of their text, so distinct tuples give unrelated seeds (no `seed + k`
    overlaps between neighbouring runs) and the value is the same in every process, platform and
    Python version (unlike `hash()`).
    """
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stochastic binarization (Salakhutdinov & Murray 2008) of images in [-1, 1].

    Pixel x becomes +1 with probability (x + 1) / 2 and -1 otherwise, so x01 = (x + 1) / 2 becomes
    1 with probability x01: black (-1) and white (+1) pixels stay as they are. The uniforms come
    from `generator` alone (it must live on `images`' device), never from the global RNG.
    """
    u = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)  # [0, 1)
    return (u < (images + 1) / 2).to(images.dtype).mul_(2).sub_(1)


def _static_binarized(images: torch.Tensor, first_index: int) -> torch.Tensor:
    """The fixed binarization of dataset items first_index, first_index + 1, ... (stacked in `images`).

    Item i always gets the uniforms of `torch.Generator().manual_seed(derive_seed("binarize/static",
    STATIC_BINARIZE_SEED, i))`, drawn on the CPU: the result depends only on the image and its index
    in the full dataset (not on holdout, batch size, seed, device or load order).
    """
    out = torch.empty_like(images)
    gen = torch.Generator()
    for k in range(images.shape[0]):
        gen.manual_seed(derive_seed("binarize/static", STATIC_BINARIZE_SEED, first_index + k))
        out[k] = binarize(images[k].cpu(), gen)
    return out


def _pil_to_tensor(resolution: int, channels: int):
    """PIL image -> (C, R, R) float in [-1, 1]; the PIL image must already have `channels` bands."""
    return transforms.Compose(
        [
            # Resize the short side, then crop: keeps aspect ratio for non-square images.
            transforms.Resize(resolution),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),  # [0, 1]
            transforms.Normalize([0.5] * channels, [0.5] * channels),  # [-1, 1]
        ]
    )


class TensorImages(Dataset):
    """Images already in memory: item i is `images[i]`, a (C, R, R) tensor (no label)."""

    def __init__(self, images: torch.Tensor):
        assert images.dim() == 4, f"expected (N, C, R, R) images, got shape {tuple(images.shape)}"
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class _StaticallyBinarized(Dataset):
    """Item i of `dataset`, binarized with the fixed per-item seed of `_static_binarized`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _static_binarized(self.dataset[index][None], index)[0]


def _images_between(dataset: Dataset, start: int, stop: int, *, binarized: bool) -> Dataset:
    """Items start..stop-1 of `dataset`, statically binarized if asked; tensors stay `TensorImages`."""
    if isinstance(dataset, TensorImages):
        images = dataset.images[start:stop]
        return TensorImages(_static_binarized(images, start) if binarized else images)
    if binarized:
        dataset = _StaticallyBinarized(dataset)
    if (start, stop) != (0, len(dataset)):
        dataset = Subset(dataset, range(start, stop))
    return dataset


def _stack(dataset: Dataset, device: torch.device, num_workers: int, seed: int) -> torch.Tensor:
    """Every item of `dataset`, in order, as one (N, C, R, R) tensor on `device`."""
    if isinstance(dataset, TensorImages):
        return dataset.images.to(device)
    from tqdm.auto import tqdm

    n = len(dataset)
    chunk = 256
    sequential = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    # Without an explicit generator, a DataLoader iterator draws its worker base seed from the
    # global torch RNG, which would shift the trainer's random stream.
    loader = DataLoader(
        dataset, batch_sampler=sequential, num_workers=num_workers, generator=torch.Generator().manual_seed(seed)
    )
    data = None
    start = 0
    with tqdm(total=n, desc="loading images", unit="img", disable=n <= _PROGRESS_MIN_ITEMS) as bar:
        for x in loader:  # (b, C, R, R)
            if data is None:
                # Preallocated so peak memory is one copy of the dataset, not two.
                data = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=device)
            data[start : start + len(x)].copy_(x)
            start += len(x)
            bar.update(len(x))
    assert start == n, f"loaded {start} of {n} images"
    return data


class _WithoutLabels(Dataset):
    """Wraps a torchvision (image, label) dataset and returns the image only."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


class _ImageFiles(Dataset):
    """Image files opened lazily by PIL; item i is files[i] as a (C, R, R) tensor."""

    def __init__(self, files: list[Path], channels: int, resolution: int):
        self.files = files
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = _pil_to_tensor(resolution, channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            return self.transform(img.convert(self.mode))


def image_files(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root` (recursive), sorted by relative path for a stable order.

    Matches `IMAGE_EXTENSIONS` case-insensitively. Hidden files and folders (names starting
    with ".") are skipped: they are macOS `._x.png` resource forks, `.git`, notebook checkpoints.
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name))
    # Sort on the relative POSIX path so the order (and thus every index) is platform-independent.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# ----------------------------------------------------------------------------------------------
# `data=` options


class ImageData(abc.ABC):
    """Base for every `data=` option: how to build the dataset, plus loader settings.

    Args:
        batch_size: images per batch (per process under DDP), >= 1.
        channels: 1 (grey) or 3 (RGB); images are converted to this.
        resolution: output side length R (images are R x R), >= 4.
        num_workers: DataLoader worker processes, >= 0.
        in_memory: stack the whole dataset into one tensor on the training device (fast for
            small datasets) instead of decoding batches on the fly.
        binarize: "none", "static" or "dynamic": stochastic binarization (see `binarize`), pixels
            become -1 or +1. "static": once, with a fixed seed (`STATIC_BINARIZE_SEED`; the same
            binarized dataset in every run). "dynamic": every batch the stream yields is binarized
            afresh from (stream seed, epoch, batch), reproducibly and resumably (see `BatchStream`).
        holdout: hold out the last `holdout` images of the dataset (in file order) for evaluation:
            the training stream never sees them and `heldout()` returns them.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        channels: int,
        resolution: int,
        num_workers: int = 0,
        in_memory: bool = True,
        binarize: str = "none",
        holdout: int = 0,
    ):
        _check_int("data.batch_size", batch_size, minimum=1)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise DataError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        _check_int("data.resolution", resolution, minimum=4)
        _check_int("data.num_workers", num_workers, minimum=0)
        if binarize not in BINARIZE_MODES:
            allowed = ", ".join(repr(m) for m in BINARIZE_MODES)
            raise DataError(f"data.binarize must be one of {allowed}, got {binarize!r}")
        _check_int("data.holdout", holdout, minimum=0)
        self.batch_size = batch_size
        self.channels = channels
        self.resolution = resolution
        self.num_workers = num_workers
        self.in_memory = bool(in_memory)
        self.binarize = binarize
        self.holdout = holdout
        self._built: tuple[Dataset, int] | None = None  # (dataset(), training size), built once

    @abc.abstractmethod
    def dataset(self) -> Dataset:
        """Build the whole dataset (held-out images included, not binarized); items are (C, R, R)
        float32 tensors in [-1, 1], no labels."""

    def _split(self) -> tuple[Dataset, int]:
        """(the whole dataset, number of training images), built and checked on first use."""
        if self._built is None:
            full = self.dataset()
            n = len(full)
            if self.holdout and n - self.holdout < self.batch_size:
                raise DataError(
                    f"data.holdout={self.holdout} leaves {max(n - self.holdout, 0)} of the dataset's {n} "
                    f"images for training, less than one batch (data.batch_size={self.batch_size}); "
                    f"data.holdout must be at most {max(n - self.batch_size, 0)}"
                )
            self._built = (full, n - self.holdout)
        return self._built

    @property
    def training_size(self) -> int:
        """How many images the training stream draws from: the dataset's size minus `holdout`."""
        return self._split()[1]

    def training_dataset(self) -> Dataset:
        """The first `training_size` images of `dataset()`, statically binarized if binarize="static"
        (binarize="dynamic" is applied per batch by the stream)."""
        full, n_train = self._split()
        return _images_between(full, 0, n_train, binarized=self.binarize == "static")

    def heldout(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The last `holdout` images of the dataset, in order, as one (N, C, R, R) float32 tensor.

        With binarize "static" or "dynamic" they are binarized with the fixed static seed (the
        same images, bit for bit, in every run and whatever the training seed).
        """
        if self.holdout == 0:
            raise DataError("data.holdout=0: no held-out images; train with data.holdout=N")
        full, n_train = self._split()
        held = _images_between(full, n_train, len(full), binarized=self.binarize != "none")
        return _stack(held, torch.device(device), self.num_workers, seed=0)

    def stream(self, seed: int, device: torch.device | str = "cpu") -> BatchStream:
        """The endless, resumable batch stream the Trainer draws from (training images only)."""
        return BatchStream(
            self.training_dataset(),
            self.batch_size,
            seed=seed,
            device=device,
            num_workers=self.num_workers,
            in_memory=self.in_memory,
            binarize=self.binarize == "dynamic",
        )

    def render(self, samples: torch.Tensor) -> torch.Tensor:
        """Generated images ``(N, C, R, R)`` in [-1, 1] -> the sample grid ``(3, H, W)`` in [0, 1]."""
        from gantrain.sampling import sample_grid

        return sample_grid(samples.float().cpu())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Digits(ImageData):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no network), upsampled to `resolution`.

    Pixel values 0..16 are scaled to [0, 1], resized (bilinear, antialiased) to R x R, then
    mapped to [-1, 1]; `channels=3` repeats the grey channel.
    """

    def dataset(self) -> TensorImages:
        from sklearn.datasets import load_digits

        images = torch.from_numpy(load_digits().images).float().div_(16.0)  # (N, 8, 8) in [0, 1]
        images = torch.nn.functional.interpolate(
            images[:, None],  # (N, 1, 8, 8)
            size=(self.resolution, self.resolution),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )  # (N, 1, R, R)
        # Bilinear weights are a convex combination; the clamp only absorbs float rounding.
        images = images.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
        if self.channels == 3:
            images = images.repeat(1, 3, 1, 1)  # (N, 3, R, R)
        return TensorImages(images.contiguous())


_IDX_MAGIC = {2049: 1, 2051: 3}  # labels: (n,); images: (n, rows, cols); both unsigned bytes


def read_idx(path: str | os.PathLike, magic: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not, as a uint8 tensor; read-only.

    Header: big-endian int32 `magic` (2049 labels, 2051 images), then one int32 per dimension.
    A wrong magic or a size that does not match the header is a `DataError` naming the file.
    """
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
    count = 1
    for d in dims:
        count *= d
    if len(data) - header != count:
        raise DataError(
            f"'{path}' holds {len(data) - header} bytes of data but its header says {'x'.join(map(str, dims))}; "
            f"the file is truncated or corrupt"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


class _OneSplit:
    """MNIST-family mixin: fetch, check and read only the files of the requested split.

    Stock torchvision MNIST insists on all four archives (train and test) even for
    `train=False`, so a test-only copy on an offline machine would fail.

    The files may sit in torchvision's `<root>/<Name>/raw` (preferred when it holds them) or
    directly in `<root>/raw`, each either as the `.gz` archive or unpacked. They are read here
    (`read_idx`), never extracted or written: a shared, read-only data folder stays untouched.
    torchvision downloads (into `<root>/<Name>/raw`) only when neither folder has the files.
    """

    _folder: str  # torchvision's folder name under root, e.g. "MNIST"

    def __init__(self, root, *, train: bool, **kwargs):
        prefix = "train-" if train else "t10k-"
        # Set before torchvision's __init__, which downloads/checks `self.resources`.
        self.resources = [r for r in type(self).resources if r[0].startswith(prefix)]
        super().__init__(root, train=train, **kwargs)

    def _split_files(self, folder: str) -> list[str] | None:
        """Path of each of the split's files in `folder` (unpacked preferred over .gz), or None if one is missing."""
        found = []
        for archive, _md5 in self.resources:  # e.g. "t10k-images-idx3-ubyte.gz"
            unpacked = os.path.join(folder, archive.removesuffix(".gz"))
            packed = os.path.join(folder, archive)
            path = unpacked if os.path.isfile(unpacked) else packed if os.path.isfile(packed) else None
            if path is None:
                return None
            found.append(path)
        return found

    @property
    def raw_folder(self) -> str:
        nested = os.path.join(self.root, self._folder, "raw")
        flat = os.path.join(self.root, "raw")
        if self._split_files(nested) is None and self._split_files(flat) is not None:
            return flat
        return nested

    def _check_exists(self) -> bool:
        return self._split_files(self.raw_folder) is not None

    def _load_data(self):
        paths = dict(zip((archive for archive, _md5 in self.resources), self._split_files(self.raw_folder)))
        split = "train" if self.train else "t10k"
        images = read_idx(paths[f"{split}-images-idx3-ubyte.gz"], 2051)  # (N, 28, 28) uint8
        labels = read_idx(paths[f"{split}-labels-idx1-ubyte.gz"], 2049)  # (N,) uint8
        if len(images) != len(labels):
            raise DataError(
                f"{len(images)} images but {len(labels)} labels in '{self.raw_folder}': "
                f"the files do not belong together"
            )
        return images, labels.long()

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, self._folder, "processed")


class _MNIST(_OneSplit, datasets.MNIST):
    _folder = "MNIST"


class _FashionMNIST(_OneSplit, datasets.FashionMNIST):
    _folder = "FashionMNIST"


_TORCHVISION_CLASSES = {"mnist": _MNIST, "fashion_mnist": _FashionMNIST, "cifar10": datasets.CIFAR10}

# name -> channels the files hold; decides whether a grey/RGB conversion is needed.
_TORCHVISION_NATIVE_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3}


class TorchvisionImages(ImageData):
    """A torchvision dataset (MNIST, Fashion-MNIST, CIFAR-10) as unlabeled images.

    Args:
        name: "mnist", "fashion_mnist" or "cifar10".
        root: folder holding (or receiving) torchvision's files; relative paths are resolved
            against the directory the run was launched from.
        split: "train" or "test".
        download: let torchvision fetch missing files. Any failure to find or fetch them is
            raised from `dataset()` as one `DataError` that points to offline alternatives.
        **common: `ImageData` arguments (batch_size, channels, resolution, ...).

    For MNIST/Fashion-MNIST only the requested split's IDX files are needed (stock torchvision
    wants both splits present), gzipped or not, in `<root>/MNIST/raw` (`FashionMNIST`) as
    torchvision lays them out or directly in `<root>/raw`; they are read in place and nothing is
    written next to them. At the native 28 px nothing is resized: pixel byte k becomes
    k / 127.5 - 1 (to float rounding).
    """

    NAMES = tuple(sorted(_TORCHVISION_NATIVE_CHANNELS))
    SPLITS = ("train", "test")

    def __init__(
        self,
        *,
        name: str,
        root: str = "./data",
        split: str = "train",
        download: bool = True,
        **common,
    ):
        super().__init__(**common)
        if name not in _TORCHVISION_NATIVE_CHANNELS:
            allowed = ", ".join(repr(n) for n in self.NAMES)
            raise DataError(
                f"data.name {name!r} is not a supported torchvision dataset; allowed: {allowed} "
                f"(or `data=folder data.path=DIR` for your own images)"
            )
        if split not in self.SPLITS:
            raise DataError(f"data.split must be 'train' or 'test', got {split!r}")
        self.name = name
        self.root = str(_absolute(root))
        self.split = split
        self.download = bool(download)

    def transform(self):
        """The PIL -> (C, R, R) [-1, 1] transform applied to every image."""
        steps = []
        if self.channels == 1 or _TORCHVISION_NATIVE_CHANNELS[self.name] == 1:
            # RGB -> grey (ITU-R 601 luma), or grey replicated into 3 equal channels.
            steps.append(transforms.Grayscale(num_output_channels=self.channels))
        steps.append(_pil_to_tensor(self.resolution, self.channels))
        return transforms.Compose(steps)

    def dataset(self) -> Dataset:
        try:
            ds = _TORCHVISION_CLASSES[self.name](
                self.root,
                train=self.split == "train",
                transform=self.transform(),
                download=self.download,
            )
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
            if self.name in ("mnist", "fashion_mnist"):
                folder = _TORCHVISION_CLASSES[self.name]._folder
                split = "train" if self.split == "train" else "t10k"
                files = f"{split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz]"
                where = f"{files} there (in {folder}/raw/ or raw/)"
            raise DataError(
                f"data.name={self.name!r} ({self.split} split): the dataset files are missing under "
                f"data.root '{self.root}' and could not be downloaded ({reason}). Put torchvision's "
                f"{where}, or train offline with `data=digits` (bundled, no network) or on your "
                f"own images with `data=folder data.path=DIR`."
            ) from None
        return _WithoutLabels(ds)


class ImageFolder(ImageData):
    """Every image under a folder, recursively (.png, .jpg, .jpeg, .webp, .bmp; any case).

    Files are sorted by relative path for a deterministic order, converted to grey ("L") or
    "RGB" to match `channels`, resized on the short side and center-cropped to R x R. Every
    file is checked once when `dataset()` is built, so a corrupt file fails the run at start
    rather than hours in.

    Args:
        path: the folder; relative paths are resolved against the launch directory.
        **common: `ImageData` arguments (batch_size, channels, resolution, ...).
    """

    def __init__(self, *, path: str, **common):
        super().__init__(**common)
        self.path = str(_absolute(path))

    def dataset(self) -> Dataset:
        from PIL import Image

        root = Path(self.path)
        if not root.exists():
            raise DataError(
                f"data.path '{root}' does not exist; set data.path to a directory of images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        if not root.is_dir():
            raise DataError(
                f"data.path '{root}' is a file, not a directory; data.path must be a directory "
                f"searched recursively for images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files = image_files(root)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under data.path '{root}'")

        bad = []
        for f in files:
            try:
                # verify() checks structure/CRCs without decoding pixels: ~0.1 ms per small PNG.
                with Image.open(f) as img:
                    img.verify()
            except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                bad.append(f)
        if bad:
            shown = ", ".join(str(p.relative_to(root)) for p in bad[:5])
            more = ", ..." if len(bad) > 5 else ""
            raise DataError(
                f"{len(bad)} of {len(files)} files under data.path '{root}' could not be read as "
                f"images: {shown}{more}; fix or remove them"
            )
        return _ImageFiles(files, self.channels, self.resolution)


# ----------------------------------------------------------------------------------------------
# Batch order


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s permutation. Unlike ``seed + epoch``, runs with seeds s and s+1 do
    not see the same orders shifted by one epoch (distinct for epochs below 1,000,003)."""
    return (seed * 1_000_003 + epoch) % 2**63


class _Order:
    """The data order: which dataset indices make up batch `batch` of epoch `epoch` on a rank."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.group = batch_size * world_size  # indices consumed per step by all ranks together
        self.batches_per_epoch = num_items // self.group
        self._perm_epoch, self._perm = -1, None  # cache: permutation of the latest epoch asked

    def indices(self, epoch: int, batch: int) -> torch.Tensor:
        """(batch_size,) int64 dataset indices, on the CPU."""
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_items, generator=gen)  # (N,)
            self._perm_epoch = epoch
        group = self._perm[batch * self.group : (batch + 1) * self.group]
        return group[self.rank :: self.world_size]


class _BatchIndices:
    """Endless batch sampler for a DataLoader: index lists from (epoch, batch) onwards.

    Holds the `_Order`, not the stream: a stream <-> iterator reference cycle would leave
    worker processes to the garbage collector, whose DataLoader shutdown can stall seconds.
    """

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
    """Endless, resumable stream of image batches: the one place that decides data order.

    Epoch e visits the dataset in the order `torch.randperm(n, generator=Generator().manual_seed(
    epoch_seed(seed, e)))`; batch b of the epoch is the b-th consecutive group of `batch_size * world_size`
    indices of that permutation, and the last incomplete group is dropped. Under DDP, rank r
    takes `group[r::world_size]`, so each rank gets exactly `batch_size` images, the ranks'
    batches are disjoint, and together they cover every image at most once per epoch.
    With world_size=1 a batch is simply `perm[b * batch_size:(b + 1) * batch_size]`.

    The stream never draws from the global torch/numpy/python RNGs, so it cannot perturb a
    bit-exact resume of the training loop.

    With `binarize=True` (data.binarize=dynamic) every batch is binarized afresh (see `binarize`)
    after it reaches `device`, with uniforms from a generator on that device seeded with
    `derive_seed("binarize/dynamic", seed, epoch, batch, rank)`: a pure function of the batch's
    position, so a resumed stream yields bit-identical batches and the in-memory and streaming
    paths agree. The noise is drawn on the batch's device (Philox on CUDA, no host work or copy
    per step), so a CPU and a CUDA run binarize differently; a run and its resume on the same
    kind of device do not.

    Args:
        dataset: items are (C, R, R) float tensors.
        batch_size: images per batch on this process.
        seed: base seed of the order.
        device: where batches are returned.
        num_workers: DataLoader workers (decoding when streaming; the one-off load when in memory).
        in_memory: stack the whole dataset on `device` once and index it (fast path), or stream
            batches through a DataLoader.
        rank, world_size: this process's place in a data-parallel group.
        binarize: binarize every batch stochastically, afresh each time (images must be in [-1, 1]).
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
    ):
        _check_int("data.batch_size", batch_size, minimum=1)
        _check_int("data.num_workers", num_workers, minimum=0)
        assert world_size >= 1 and 0 <= rank < world_size, f"bad rank {rank} of world_size {world_size}"
        n = len(dataset)
        group = batch_size * world_size
        if n < group:
            across = f" x world_size {world_size} = {group}" if world_size > 1 else ""
            raise DataError(
                f"data.batch_size={batch_size}{across} is larger than the dataset ({n} images); "
                f"use data.batch_size <= {n // world_size}"
            )
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
        self._data = _stack(dataset, self.device, num_workers, self.seed) if self.in_memory else None  # (N, C, R, R)

    def _loader(self, batch_sampler, num_workers: int, pin_memory: bool, persistent: bool) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent,
            # Without an explicit generator, every new DataLoader iterator draws its worker base
            # seed from the global torch RNG, which would shift the trainer's random stream.
            generator=torch.Generator().manual_seed(self.seed),
        )

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        """The next (batch_size, C, R, R) batch on `device`."""
        if self.in_memory:
            idx = self._order.indices(self._epoch, self._batch).to(self._data.device)
            batch = self._data[idx]
        else:
            if self._loader_iter is None:
                sampler = _BatchIndices(self._order, self._epoch, self._batch)
                workers = self.num_workers
                loader = self._loader(sampler, workers, self.device.type == "cuda", workers > 0)
                self._loader_iter = iter(loader)
            batch = next(self._loader_iter).to(self.device, non_blocking=True)
        if self.binarize:
            if self._noise is None or self._noise.device != batch.device:
                self._noise = torch.Generator(device=batch.device)
            self._noise.manual_seed(derive_seed("binarize/dynamic", self.seed, self._epoch, self._batch, self.rank))
            batch = binarize(batch, self._noise)
        # Count consumption here, not in the sampler: DataLoader workers prefetch ahead.
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return batch

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

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
