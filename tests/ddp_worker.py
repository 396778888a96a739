"""One process of tests/test_distributed.py's equivalence runs (``python tests/ddp_worker.py OUT``).

With ``RANK``/``WORLD_SIZE`` set (2 ranks, batch b each) it trains through gantrain's DDP path; without,
it is the 1-process reference with batch 2b, fed what the ranks drew: real batch i is the concatenation
of the ranks' batches i, and every draw from the global RNG (noise, GP's alpha, the VAE's eps) is the
concatenation of the ranks' draws, from generators seeded as :class:`gantrain.distributed.RankBarriers`
seeds each rank. Writes the weights and gradients after 3 steps, the all-reduces per phase and the
hygiene checks to OUT (a torch file) per scenario.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gantrain import distributed  # noqa: E402
from gantrain.batch import Batch  # noqa: E402
from gantrain.build import build  # noqa: E402
from gantrain.data.common import derive_seed  # noqa: E402
from gantrain.errors import GantrainError  # noqa: E402
from gantrain.events import Callback  # noqa: E402
from gantrain.objectives import GANObjective  # noqa: E402
from gantrain.runlog import RunLog  # noqa: E402
from tests.conftest import make_cfg  # noqa: E402

D_LOSS = GANObjective.d_loss
B = 4  # images per rank and micro-batch
RANKS = 2
STEPS = 3
GAN = ["+experiment=dcgan", "model.g.norm=none", "model.d.norm=none"]  # BatchNorm statistics are per rank
R1_ONLY = [*GAN, "loss.r1.gamma=1"]  # a D loss that is only R1, which misses D's last bias: the unused-parameter trap
# labels on reals and fakes: G embeds them (no BatchNorm), D projects them and classifies (ACGAN), RpGAN and R2
CONDITIONAL = [
    "+experiment=acgan",
    "loss=rpgan",
    "loss.r2.gamma=1",
    "model.g.norm=none",
    "model.d.norm=none",
    "model.d.projection=true",
]
SCENARIOS = {  # name -> (accumulated micro-batches, overrides)
    **{f"dcgan/{k}": (k, GAN) for k in (1, 2)},
    **{f"wgan_gp/{k}": (k, ["+experiment=wgan_gp", "model.g.norm=none"]) for k in (1, 2)},
    **{f"vae/{k}": (k, ["+experiment=vae"]) for k in (1, 2)},
    **{f"conditional/{k}": (k, CONDITIONAL) for k in (1, 2)},
    "lecam/2": (2, [*GAN, "loss.lecam.weight=1", "loss.lecam.decay=0.5"]),  # the averages span both ranks
    "dcgan_batchnorm": (1, ["+experiment=dcgan"]),  # hygiene only: per-rank batch statistics differ from 2b's
    "r1_only": (1, [*R1_ONLY, "trainer.ddp.find_unused_parameters=true"]),
    "r1_only/find_unused_off": (1, R1_ONLY),
    # ADA adjusting p after every D step, by 2 * 8 / 64 (the ranks' reals, all-reduced): p after each D step
    "ada/2": (2, [*GAN, "augment=ada", "augment.p=0.5", "augment.adjust_every=1", "augment.speed_images=64"]),
}


def r1_only(self, model, batch: Batch, step: int = 0, shared=None) -> torch.Tensor:
    """GANObjective.d_loss with only the R1 term."""
    return self.penalties["r1"](model.d, self.adversarial.d_input(batch.x), None)


class Batches:
    """Real batch i: rows [i * RANKS * B + rank * B, ...) of ``images`` (the reference: all ranks' rows)."""

    def __init__(self, images: torch.Tensor, rank: int | None, labels: torch.Tensor | None = None):
        self.images, self.rank, self.labels, self.i = images, rank, labels, 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        start = self.i * RANKS * B + (0 if self.rank is None else self.rank * B)
        n = RANKS * B if self.rank is None else B
        self.i += 1
        index = torch.arange(start, start + n) % len(self.images)
        return Batch(self.images[index], None if self.labels is None else self.labels[index])

    def state_dict(self) -> dict:
        return {"i": self.i}


class RankDraws(Callback):
    """The reference's RNG: torch.randn/rand/randn_like/randint without a generator return the ranks' draws,
    concatenated."""

    def __init__(self, seed: int):
        self.seed = seed
        self.gens = [torch.Generator() for _ in range(RANKS)]
        for name in ("randn", "rand"):
            setattr(torch, name, self.split(getattr(torch, name)))
        randint = torch.randint
        torch.randint = lambda low, high, size, **kw: self.split(lambda shape, **k: randint(low, high, shape, **k))(
            size, **kw
        )
        randn = torch.randn
        torch.randn_like = lambda x, **kw: randn(x.shape, dtype=x.dtype, device=x.device)

    def split(self, fn):
        def draw(*size, generator=None, **kw):
            if generator is not None:
                return fn(*size, generator=generator, **kw)
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
            half = (shape[0] // RANKS, *shape[1:])
            return torch.cat([fn(half, generator=g, **kw) for g in self.gens])

        return draw

    def reseed(self, step: int) -> None:
        for rank, g in enumerate(self.gens):
            g.manual_seed(derive_seed("noise", self.seed, rank, step))

    def on_fit_start(self, trainer) -> None:
        self.reseed(trainer.step)

    def on_step_end(self, trainer) -> None:
        self.reseed(trainer.step)


class AugmentP(Callback):
    """ADA's p after every D phase."""

    def __init__(self, ada):
        self.ada, self.ps = ada, []

    def on_phase_end(self, trainer, phase) -> None:
        if phase.name == "D":
            self.ps.append(self.ada.p.item())


class Hygiene(Callback):
    """After every phase: each network's parameters, gradients and buffers (BatchNorm statistics) equal rank 0's
    bit for bit, and the requires_grad flags are restored."""

    def __init__(self):
        self.checks: list[bool] = []

    def on_phase_end(self, trainer, phase) -> None:
        for net in trainer.model.children():
            tensors = [p.detach() for p in net.parameters()] + [p.grad for p in net.parameters() if p.grad is not None]
            tensors += [b.to(tensors[0].dtype) for b in net.buffers()]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            first = flat.clone()
            dist.broadcast(first, src=0)
            self.checks.append(torch.equal(flat, first))
        self.checks.append(all(p.requires_grad for p in trainer.model.parameters()))


def run(name: str, k: int, overrides: list[str], group: distributed.Group, run_dir: Path) -> dict:
    GANObjective.d_loss = r1_only if name.startswith("r1_only") else D_LOSS
    cfg = make_cfg(
        *overrides,
        f"data.batch_size={B if group.distributed else RANKS * B}",
        f"trainer.accumulate_grad_batches={k}",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.sample_every_n_steps=100",
    )
    trainer = build(cfg, run_dir, group)
    for callback in trainer.callbacks:
        if isinstance(callback, RunLog):
            callback.sampler = None  # the VAE's pictures show the float32 data, not these batches
    images = trainer.data.images.double()
    trainer.data = Batches(images, group.rank if group.distributed else None, trainer.data.labels)
    counts = {}
    hygiene = Hygiene()
    ada = trainer.state.parts.get("augment")
    augment_p = AugmentP(ada)
    if ada is not None:
        trainer.callbacks.append(augment_p)
    if group.distributed:
        for phase in trainer.phases:
            counts[phase.name] = 0

            def hook(state, bucket, name=phase.name):
                counts[name] += 1
                return default_hooks.allreduce_hook(None, bucket)

            phase.loss.register_comm_hook(None, hook)
        trainer.callbacks.append(hygiene)
    else:
        trainer.callbacks.append(RankDraws(cfg.seed))
    try:
        trainer.fit()
    except GantrainError as e:
        return {"error": str(e)}
    model = trainer.model
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "allreduces": counts,
        "steps": {p.name: trainer.iteration // p.interval for p in trainer.phases},
        "hygiene": hygiene.checks,
        "augment_p": augment_p.ps,
    }


def main(out: str, wanted: list[str]) -> None:
    """Run the SCENARIOS named in ``wanted`` (``dcgan/2``; all if empty), write their results to ``out``."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    group = distributed.init_from_env("cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (k, overrides) in SCENARIOS.items():
            if wanted and name not in wanted:
                continue
            run_dir = Path(group.broadcast(str(Path(tmp) / name.replace("/", "_"))))
            results[name] = run(name, k, overrides, group, run_dir)
    torch.save(results, out if group.rank == 0 else f"{out}.rank{group.rank}")
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2:])
