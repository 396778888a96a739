"""Train the small MNIST classifier whose features ``gantrain.extractors.mnist.MnistFeatures`` gives to FID/KID/PR.

    python scripts/mnist_classifier.py                          # -> outputs/mnist_classifier.pt, ~1-2 CPU min
    python scripts/mnist_classifier.py --out weights/mnist.pt --epochs 8 --force

Offline, on the 10,000 MNIST test images (IDX files under ``--data``/raw, as ``data=mnist data.split=test``
reads them), resized to 32 px as ``data=mnist`` resizes them for a 32 px model. The last ``--holdout`` images
are never trained on; the accuracy on them is printed and stored in the file. An existing ``--out`` is
replaced only with ``--force``; the file is written atomically, so a failed run leaves the old one intact.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gantrain.extractors.mnist import DEFAULT_WEIGHTS, MnistClassifier, to_classifier_input
from gantrain.files import atomic_write

REPO = Path(__file__).resolve().parents[1]


def load_mnist_t10k(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 32, 32) in [-1, 1], labels (N,)) of MNIST's test split, resized as ``data=mnist`` does."""
    from PIL import Image

    from gantrain.data.folder import pil_to_tensor
    from gantrain.data.mnist import idx_files, read_idx

    files = idx_files(root, "MNIST", "t10k")
    if files is None:
        raise FileNotFoundError(
            f"--data {root}: no t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in raw/"
        )
    to_tensor = pil_to_tensor(32, 1)
    images = torch.stack([to_tensor(Image.fromarray(a.numpy())) for a in read_idx(files[0], 2051)])
    return images, read_idx(files[1], 2049).long()


@torch.no_grad()
def accuracy(net: MnistClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of ``images`` (generator-style input) classified as ``labels``, in eval mode."""
    net.eval()
    right = sum(
        (net(to_classifier_input(images[i : i + batch])).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return right / len(images)


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int, seed: int) -> MnistClassifier:
    """Adam 1e-3 with cosine decay, random shifts of up to 2 px (so strokes slightly off-centre still read)."""
    torch.manual_seed(seed)
    net = MnistClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    padded = F.pad(images, (2, 2, 2, 2), value=-1.0)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(images))
        for i in range(len(images) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            dx, dy = torch.randint(0, 5, (2,)).tolist()
            x = padded[idx, :, dy : dy + 32, dx : dx + 32]
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mnist_classifier.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist-t10k", metavar="DIR")
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_WEIGHTS), metavar="PATH", help="%(default)s")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--holdout", type=int, default=2000, help="last N images, never trained on (%(default)s)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists() and not args.force:
        ap.error(f"--out {args.out}: exists; pass --force to replace it")
    if args.out.is_dir():
        ap.error(f"--out {args.out}: is a folder; give a file path")
    for name in ("epochs", "holdout", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    try:
        images, labels = load_mnist_t10k(args.data)
    except (FileNotFoundError, ValueError) as e:  # ValueError: gantrain's DataError for a corrupt IDX file
        ap.error(str(e))
    if args.holdout >= len(images):
        ap.error(f"--holdout {args.holdout}: must be below the {len(images)} images in {args.data}")
    n = len(images) - args.holdout
    t0 = time.perf_counter()
    net = train(images[:n], labels[:n], args.epochs, args.batch_size, args.seed)
    acc = accuracy(net, images[n:], labels[n:])
    saved = {
        "state_dict": net.state_dict(),
        "heldout_accuracy": acc,
        "holdout": args.holdout,
        "train_images": n,
        "epochs": args.epochs,
        "seed": args.seed,
    }
    atomic_write(args.out, lambda f: torch.save(saved, f))
    print(
        f"held-out accuracy {100 * acc:.2f}% on the last {args.holdout} of {len(images)} MNIST test images "
        f"({n} trained on, {args.epochs} epochs, {time.perf_counter() - t0:.0f} s); weights: {args.out}"
    )


if __name__ == "__main__":
    main()
