"""Image files on disk: `ImageFolder` (`data=folder`) and the PIL -> tensor pipeline it shares with MNIST."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from gantrain.data.common import DataError
from gantrain.data.images import ImageData

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def absolute(path: str | os.PathLike) -> Path:
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


def pil_to_tensor(resolution: int, channels: int):
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


class _ImageFiles(Dataset):
    """Image files opened lazily by PIL; item i is files[i] as a (C, R, R) tensor."""

    def __init__(self, files: list[Path], channels: int, resolution: int):
        self.files = files
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = pil_to_tensor(resolution, channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            return self.transform(img.convert(self.mode))


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
        self.path = str(absolute(path))

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
            raise DataError(
                f"{len(bad)} of {len(files)} files under data.path '{root}' could not be read as "
                f"images: {shown}; fix or remove them"
            )
        return _ImageFiles(files, self.channels, self.resolution)
