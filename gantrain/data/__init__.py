"""Training data for gantrain: the `data=` options and the one batch stream.

- `images`: the `ImageData` base (checks, `holdout`, `binarize`, the stream) and `Digits`;
- `folder`: `ImageFolder`, every image file under a folder;
- `mnist`: `TorchvisionImages` (MNIST, Fashion-MNIST, CIFAR-10) and `read_idx`, our IDX reader;
- `mixtures`: the 2-D Gaussian mixtures `Ring` (ring8) and `Grid` (grid25), points, not images;
- `stream`: `BatchStream`, the resumable image stream whose order is a pure function of (seed, epoch, rank);
- `binarization`: stochastic binarization (`binarize`); `common`: `DataOption` (what an option declares),
  `DataError` and `derive_seed`, the one seeding scheme.

Every option's `stream(seed, device, rank=0, world_size=1)` yields `gantrain.batch.Batch`es: images in [-1, 1]
(or 2-D points) and their class labels, if the data has any; `num_classes` says how many (0: none).
"""

from gantrain.data.binarization import binarize
from gantrain.data.common import DataError, DataOption, derive_seed
from gantrain.data.folder import ImageFolder, image_files
from gantrain.data.images import Digits, ImageData
from gantrain.data.mixtures import Grid, Mixture, MixtureStream, Ring, mode_metrics
from gantrain.data.mnist import TorchvisionImages, read_idx
from gantrain.data.stream import BatchStream, TensorImages

__all__ = [
    "BatchStream",
    "DataError",
    "DataOption",
    "Digits",
    "Grid",
    "ImageData",
    "ImageFolder",
    "Mixture",
    "MixtureStream",
    "Ring",
    "TensorImages",
    "TorchvisionImages",
    "binarize",
    "derive_seed",
    "image_files",
    "mode_metrics",
    "read_idx",
]
