"""Image files on disk: `ImageFolder` (`data=folder`) and the PIL -> tensor pipeline it shares with MNIST."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gantrain.data.common import DataError, refuse_native
from gantrain.data.images import ImageData

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the launch directory (Hydra's original cwd: it may chdir into the run directory
    before our objects are built)."""
    path = Path(path).expanduser()
    from hydra.core.hydra_config import HydraConfig  # local: keep `import gantrain.data` light

    if HydraConfig.initialized():
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(path))).resolve()
    return path.resolve()


def pil_to_tensor(resolution: int | None, channels: int):
    """PIL image -> (C, R, R) float in [-1, 1]; the PIL image must already have `channels` bands. ``resolution``
    None: the image at its own size (C, H, W), not resized."""
    from torchvision import transforms  # here, not at import: torchvision takes ~1.5 s to import

    # Resize the short side, then crop: keeps aspect ratio for non-square images.
    resize = [] if resolution is None else [transforms.Resize(resolution), transforms.CenterCrop(resolution)]
    return transforms.Compose(
        [
            *resize,
            transforms.ToTensor(),  # [0, 1]
            transforms.Normalize([0.5] * channels, [0.5] * channels),  # [-1, 1]
        ]
    )


def image_files(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root` (recursive), sorted by relative path for a stable order. Matches `IMAGE_EXTENSIONS`
    case-insensitively; hidden files and folders (macOS `._x.png`, `.git`) are skipped."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name))
    # Sort on the relative POSIX path so the order (and thus every index) is platform-independent.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def folder_labels(files: list[Path], root: Path) -> torch.Tensor | None:
    """(N,) int64 class of each file, the index of its first-level subfolder under `root` among those holding
    images (sorted by name), when every file lies in one; None when none or any file lies in `root` itself."""
    tops = [f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1]
    if not tops or len(tops) < len(files):
        return None
    index = {name: k for k, name in enumerate(sorted(set(tops)))}
    return torch.tensor([index[t] for t in tops], dtype=torch.int64)


class _ImageFiles(Dataset):
    """Image files opened lazily by PIL; item i is files[i] as a (C, R, R) tensor, `labels` their classes or None. A
    file that cannot be decoded (pixel data `verify()` cannot see) stops the run with a `DataError` naming it, or with
    `skip_corrupt` is replaced by the next readable file (wrapping around; it keeps the corrupt one's label), with one
    warning per file and process: the same replacement in every run, so order and resume stay as they were."""

    def __init__(
        self, files: list[Path], channels: int, resolution: int | None, root: Path, skip_corrupt: bool = False
    ):
        self.files, self.root, self.skip_corrupt = files, root, skip_corrupt
        self.labels = folder_labels(files, root)
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = pil_to_tensor(resolution, channels)
        self._warned: set[int] = set()  # corrupt files already reported by this process

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        for i in (j % len(self.files) for j in range(index, index + len(self.files))):
            try:
                img = self._decode(i)
            except DataError as e:
                if not self.skip_corrupt:
                    raise DataError(
                        f"{e}; replace or remove the file, or set data.skip_corrupt=true to train on the next "
                        "readable file in its place"
                    ) from None
                if i not in self._warned:
                    self._warned.add(i)
                    log.warning("data.skip_corrupt: %s; the next readable file takes its place", e)
                continue
            return self.transform(img)
        raise DataError(f"no file under data.path '{self.root}' can be decoded as an image")

    def _decode(self, i: int):
        """File i as a PIL image of `mode`, pixels decoded; DataError naming the file if they cannot be."""
        from PIL import Image

        try:
            with Image.open(self.files[i]) as img:
                return img.convert(self.mode)  # decodes every pixel
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for broken files
            name = self.files[i].relative_to(self.root)
            raise DataError(
                f"data.path: cannot decode '{name}' under '{self.root}' ({type(e).__name__}: {e})"
            ) from None


class ImageFolder(ImageData):
    """Every image under a folder, recursively (.png, .jpg, .jpeg, .webp, .bmp; any case).

    Files are sorted by relative path, converted to "L" or "RGB" to match `channels`, resized on the short side and
    center-cropped to R x R. Every file's structure is checked when `dataset()` is built, so a broken file fails at
    start rather than hours in; bad pixel data stops the run when first drawn (see `skip_corrupt`).

    Args:
        path: the folder; relative paths are resolved against the launch directory.
        skip_corrupt: instead of stopping, train on the next readable file (in file order) in place of each one
            that cannot be read, with a warning naming it; size and order stay, so runs stay reproducible.
        **common: `ImageData` arguments (batch_size, channels, resolution, ...).

    Labels: when every image lies in a first-level subfolder (``path/cat/1.png``, ``path/dog/a/2.png``), that
    subfolder is its class (`num_classes` subfolders, in sorted order); when any lies in `path` itself, none.
    """

    def __init__(self, *, path: str, skip_corrupt: bool = False, **common):
        super().__init__(**common)
        self.path = str(absolute(path))
        self.skip_corrupt = bool(skip_corrupt)

    @property
    def num_classes(self) -> int:
        """The first-level subfolders holding images when they hold them all, else 0 (a walk of the folder)."""
        labels = folder_labels(image_files(self.path), Path(self.path))
        return 0 if labels is None else int(labels.max()) + 1

    def dataset(self) -> Dataset:
        from PIL import Image

        root, kinds = Path(self.path), ", ".join(IMAGE_EXTENSIONS)
        if not root.exists():
            raise DataError(f"data.path '{root}' does not exist; set data.path to a directory of images ({kinds})")
        if not root.is_dir():
            raise DataError(
                f"data.path '{root}' is a file, not a directory; data.path must be a directory "
                f"searched recursively for images ({kinds})"
            )
        files = image_files(root)
        if not files:
            raise DataError(f"no images ({kinds}) under data.path '{root}'")

        bad = []
        for f in files:
            try:
                # verify() checks structure/CRCs without decoding pixels: ~0.1 ms per small PNG.
                with Image.open(f) as img:
                    img.verify()
            except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                bad.append(f)
        if bad:
            shown = ", ".join(str(p.relative_to(root)) for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
            message = f"{len(bad)} of {len(files)} files under data.path '{root}' could not be read as images: {shown}"
            if not self.skip_corrupt:
                raise DataError(f"{message}; fix or remove them, or set data.skip_corrupt=true")
            if len(bad) == len(files):
                raise DataError(message)
            log.warning("data.skip_corrupt: %s; each is replaced by the next readable file", message)
        return _ImageFiles(files, self.channels, self.resolution, root, self.skip_corrupt)

    def native_dataset(self) -> Dataset | None:
        """The files of `dataset()` at their own size; they must all have one (width x height, read from their headers),
        else ``metrics.reference_resolution=native`` is refused in one line naming two that differ."""
        from PIL import Image

        full, root = self._split()[0], Path(self.path)
        files = getattr(full, "files", None)
        if files is None:  # a subclass's own dataset()
            return None
        sizes: dict[tuple[int, int], Path] = {}
        for f in files:
            try:
                with Image.open(f) as img:  # the header only
                    sizes.setdefault(img.size, f)
            except Exception:  # noqa: BLE001 - unreadable: dataset() warned (skip_corrupt) and its stand-in is read
                continue
            if len(sizes) > 1:
                (a, fa), (b, fb) = sizes.items()
                shown = lambda size, f: f"'{f.relative_to(root)}' is {size[0]}x{size[1]}"  # noqa: E731
                refuse_native(
                    f"the images under '{root}'",
                    f"differ in size ({shown(a, fa)}, {shown(b, fb)}): native needs one size; model resizes each to "
                    f"{self.resolution} px",
                )
        return _ImageFiles(files, self.channels, None, root, self.skip_corrupt)
