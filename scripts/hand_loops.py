"""Hand-written training loops in the pytorch/examples style: the baselines ``scripts/bench.py`` times
``python -m gantrain`` against, as whole processes and in-process.

    python scripts/hand_loops.py dcgan --steps 120      # what bench.py runs, one process per measurement
    python scripts/hand_loops.py dcgan --steps 2000 --data ../shared/data/mnist-t10k --seed 1 --save g.pt
    python scripts/hand_loops.py dcgan --steps 2000 --data ../shared/data/mnist-t10k --lr 4e-4 --save g.pt

``--data DIR`` trains on MNIST's IDX files in ``DIR/raw`` (the test split, as ``data=mnist data.split=test``
reads them) instead of the digits; ``--save`` writes G's ``state_dict`` (``scripts/recipe_fid.py`` scores it
with the same extractor and samples as the recipe it is compared with).

Each is the plain script a user would write for the recipe of that name at its default settings
(``+experiment=NAME data=digits``): the same networks (gantrain's model classes, so the architecture is the
same by construction; bench.py also compares the parameter shapes with the recipe's), the same optimizer
settings and batch (except dcgan's learning rate: the loop keeps pytorch/examples' 2e-4, the recipe's 4e-4 is
tuned for its 2,000 steps; a learning rate does not change what a step costs), the digits loaded and upsampled
once into memory and shuffled every epoch; the losses are read and printed every 10 steps (gantrain's default
logging interval). No sample grids, checkpoints, gradient norms or TensorBoard: what the Trainer adds costs
it.

* ``dcgan``: pytorch/examples/dcgan's iteration. One generated batch per iteration: D steps on the real
  batch and ``fake.detach()``, then G's loss goes through D (frozen, updated) and the same ``fake``.
* ``wgan_gp``: Gulrajani et al.'s loop: 5 critic steps, each on a fresh real batch and a fake generated
  without a graph, with the gradient penalty (lambda 10) on per-sample interpolates; then one G step on
  fresh noise with the critic frozen.
* ``vae``: pytorch/examples/vae's loop: the negative ELBO (Bernoulli likelihood of the pixels in [0, 1],
  analytic KL) of one reparameterised sample per image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gantrain.errors import GantrainError
from gantrain.models import dcgan, vae

BATCH = 64
RESOLUTION = 32
LOG_EVERY = 10


def digits(resolution: int = RESOLUTION) -> torch.Tensor:
    """scikit-learn's 8x8 digits in [-1, 1], upsampled to ``(N, 1, R, R)``."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().div_(16.0)[:, None]
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp_(0, 1).mul_(2).sub_(1).contiguous()


def mnist_t10k(root: str | Path, resolution: int = RESOLUTION) -> torch.Tensor:
    """Every MNIST test image under ``root`` as ``data=mnist data.split=test`` gives it: (N, 1, R, R), [-1, 1]."""
    from gantrain.data.mnist import TorchvisionImages

    data = TorchvisionImages(
        name="mnist", root=str(root), split="test", download=False, channels=1, resolution=resolution
    )
    images = data.dataset()
    return torch.stack([images[i] for i in range(len(images))])


class Batches:
    """Shuffled batches of an in-memory tensor, a new permutation every epoch, the last partial batch dropped."""

    memory_format = torch.contiguous_format  # torch.channels_last: --channels-last (speed_up)

    def __init__(self, data: torch.Tensor, batch: int = BATCH):
        self.data, self.batch, self.i, self.perm = data, batch, 0, torch.randperm(data.shape[0])

    def __next__(self) -> torch.Tensor:
        if (self.i + 1) * self.batch > self.perm.numel():
            self.i, self.perm = 0, torch.randperm(self.data.shape[0])
        idx = self.perm[self.i * self.batch : (self.i + 1) * self.batch].to(self.data.device)
        self.i += 1
        return self.data[idx].contiguous(memory_format=self.memory_format)


def weights_init(m: nn.Module) -> None:
    """pytorch/examples/dcgan's init: conv weights N(0, 0.02), BatchNorm gains N(1, 0.02), biases 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def dcgan_generator() -> dcgan.Generator:
    """The dcgan recipe's G (nz 100, 64 wide, 1 channel, 32 px), as the loop trains it and ``--save`` writes it."""
    return dcgan.Generator(nz=100, ngf=64, channels=1, resolution=RESOLUTION)


class DCGAN:
    def __init__(self, data: torch.Tensor, log: Callable[[str], None] = print, lr: float = 2e-4):
        dev = data.device
        self.g = dcgan_generator().to(dev)
        self.d = dcgan.Discriminator(ndf=64, channels=1, resolution=RESOLUTION).to(dev)
        self.g.apply(weights_init)
        self.d.apply(weights_init)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=lr, betas=(0.5, 0.999))
        self.batches, self.log = Batches(data), log

    def networks(self) -> dict[str, nn.Module]:
        return {"g": self.g, "d": self.d}

    def step(self, i: int) -> None:
        g, d = self.g, self.d
        real = next(self.batches)
        # (1) D: maximize log D(x) + log(1 - D(G(z)))
        d.zero_grad()
        output = d(real)
        err_d_real = F.binary_cross_entropy_with_logits(output, torch.ones_like(output))
        err_d_real.backward()
        noise = torch.randn(real.shape[0], 100, 1, 1, device=real.device)
        fake = g(noise)
        output = d(fake.detach())
        err_d_fake = F.binary_cross_entropy_with_logits(output, torch.zeros_like(output))
        err_d_fake.backward()
        self.opt_d.step()
        # (2) G: maximize log D(G(z)), through the same fake, D frozen
        g.zero_grad()
        d.requires_grad_(False)
        output = d(fake)
        err_g = F.binary_cross_entropy_with_logits(output, torch.ones_like(output))
        err_g.backward()
        self.opt_g.step()
        d.requires_grad_(True)
        if i % LOG_EVERY == 0:
            self.log(f"[{i}] Loss_D: {(err_d_real + err_d_fake).item():.4f} Loss_G: {err_g.item():.4f}")


class WGANGP:
    def __init__(self, data: torch.Tensor, log: Callable[[str], None] = print):
        dev = data.device
        self.g = dcgan.Generator(nz=100, ngf=32, channels=1, resolution=RESOLUTION).to(dev)
        self.d = dcgan.Discriminator(ndf=32, channels=1, resolution=RESOLUTION, norm="none").to(dev)
        self.g.apply(weights_init)
        self.d.apply(weights_init)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.batches, self.log = Batches(data), log

    def networks(self) -> dict[str, nn.Module]:
        return {"g": self.g, "d": self.d}

    def step(self, i: int) -> None:
        g, d = self.g, self.d
        for _ in range(5):  # critic iterations
            real = next(self.batches)
            d.zero_grad()
            with torch.no_grad():
                fake = g(torch.randn(real.shape[0], 100, 1, 1, device=real.device))
            wasserstein = d(fake).mean() - d(real).mean()
            alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
            interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            (grads,) = torch.autograd.grad(d(interpolates).sum(), interpolates, create_graph=True)
            penalty = 10.0 * ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
            (wasserstein + penalty).backward()
            self.opt_d.step()
        g.zero_grad()
        d.requires_grad_(False)
        err_g = -d(g(torch.randn(BATCH, 100, 1, 1, device=real.device))).mean()
        err_g.backward()
        self.opt_g.step()
        d.requires_grad_(True)
        if i % LOG_EVERY == 0:
            self.log(f"[{i}] Loss_D: {(wasserstein + penalty).item():.4f} Loss_G: {err_g.item():.4f}")


class VAE:
    def __init__(self, data: torch.Tensor, log: Callable[[str], None] = print):
        encoder = vae.ConvEncoder(channels=1, resolution=RESOLUTION, ndf=32, latent_dim=32)
        decoder = vae.ConvDecoder(channels=1, resolution=RESOLUTION, ngf=32, latent_dim=32)
        self.model = vae.VAE(encoder, decoder, latent_dim=32).to(data.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches, self.log = Batches(data), log

    def networks(self) -> dict[str, nn.Module]:
        return {"g": self.model}

    def step(self, i: int) -> None:
        x = next(self.batches)
        self.opt.zero_grad()
        mu, logvar = self.model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.model.decode(z)
        recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="sum") / x.shape[0]
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
        loss = recon + kl
        loss.backward()
        self.opt.step()
        if i % LOG_EVERY == 0:
            self.log(f"[{i}] loss: {loss.item():.4f}")


LOOPS = {"dcgan": DCGAN, "wgan_gp": WGANGP, "vae": VAE}
IMAGES_PER_STEP = {"dcgan": BATCH, "wgan_gp": 5 * BATCH, "vae": BATCH}  # real images a step draws
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16}  # fp16 would need a GradScaler per network: not here


def speed_up(loop, compile: str | None = None, channels_last: bool = False, matmul_precision: str = "highest"):
    """What a user adds by hand for gantrain's trainer.compile/channels_last/matmul_precision: the networks
    compiled in place (not WGAN-GP's critic: the penalty's double backward does not compile; with channels_last on
    a GPU, not a network with a transposed convolution: pytorch/pytorch#171622, as gantrain.speed), NHWC weights and
    batches, TF32/bf16 float32 matmuls."""
    torch.set_float32_matmul_precision(matmul_precision)
    if channels_last:
        for net in loop.networks().values():
            net.to(memory_format=torch.channels_last)
        loop.batches.memory_format = torch.channels_last
    if compile:
        for name, net in loop.networks().items():
            if isinstance(loop, WGANGP) and name == "d":
                continue
            on_gpu = next(net.parameters()).device.type in ("cuda", "mps")
            if channels_last and on_gpu and any(isinstance(m, nn.ConvTranspose2d) for m in net.modules()):
                continue
            for part in [getattr(net, p) for p in getattr(net, "compile_parts", ())] or [net]:
                part.compile(mode=compile)
    return loop


def autocast(device: str, precision: str):
    """The loop's step under autocast at ``precision`` (32: nothing)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", choices=sorted(LOOPS))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", metavar="DIR", help="MNIST IDX files in DIR/raw (default: the bundled digits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, metavar="PATH", help="write G's state_dict here after the last step")
    ap.add_argument(
        "--lr", type=float, help="dcgan only: Adam's learning rate for G and D (default 2e-4, pytorch/examples')"
    )
    ap.add_argument("--compile", metavar="MODE", help="torch.compile the networks: default, reduce-overhead, ...")
    ap.add_argument("--channels-last", action="store_true", help="networks and batches in channels-last format")
    ap.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"])
    ap.add_argument("--precision", default="32", choices=sorted(PRECISIONS), help="autocast dtype")
    args = ap.parse_args()
    if args.lr is not None and (args.recipe != "dcgan" or args.lr <= 0):
        ap.error(f"--lr {args.lr}: only for dcgan, and > 0")
    torch.manual_seed(args.seed)
    try:
        data = (mnist_t10k(args.data) if args.data else digits()).to(args.device)
    except GantrainError as e:  # no MNIST files under --data: one line
        ap.error(f"--data {args.data}: {e}")
    loop = LOOPS[args.recipe](data, **({} if args.lr is None else {"lr": args.lr}))
    speed_up(loop, args.compile, args.channels_last, args.matmul_precision)
    with autocast(args.device, args.precision):
        for i in range(args.steps):
            loop.step(i)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    if args.save:
        torch.save(loop.networks()["g"].state_dict(), args.save)


if __name__ == "__main__":
    main()
