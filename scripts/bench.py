"""Framework overhead: steady-state ms/step of the DCGAN recipe through gantrain's Trainer versus a
hand-written PyTorch loop doing the same work, in the same process, on the same data.

    python scripts/bench.py                       # CPU, the dcgan recipe at batch 64
    python scripts/bench.py --device cuda --steps 50
    python scripts/bench.py --write docs/benchmarks.md

Both loops start from the same weights, use the same Adam settings, the same in-memory digits
tensor and per step do: one D update on a real batch and detached fakes from fresh noise, then
one G update on fresh noise with D frozen. Every step is timed; blocks of steps alternate
between the loops (so drift in machine load hits all of them; the order rotates every round),
and the overhead is the ratio of mean step times. A third, informational row
is the common "reuse the D step's fakes for the G step" loop, which skips one G forward; the
Trainer cannot do that without letting G's graph live through the D phase.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gantrain.events import Callback
from gantrain.files import replace_marked_section
from gantrain.train import build, compose_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Handwritten:
    """The plain loop: no phases, no stats sink, no progress bar, no checkpoints."""

    def __init__(self, g, d, data: torch.Tensor, batch: int, lr: float, betas, reuse_fakes: bool):
        self.g, self.d, self.data, self.batch, self.reuse = g, d, data, batch, reuse_fakes
        self.opt_g = torch.optim.Adam(g.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(d.parameters(), lr=lr, betas=betas)
        self.gen = torch.Generator().manual_seed(0)
        self.nz = g.latent_shape

    def step(self) -> None:
        g, d, dev = self.g, self.d, self.data.device
        idx = torch.randint(0, self.data.shape[0], (self.batch,), generator=self.gen).to(dev)
        real = self.data[idx]
        z = torch.randn((self.batch, *self.nz), device=dev)
        # D step
        if self.reuse:
            fake = g(z)
            fake_d = fake.detach()
        else:
            with torch.no_grad():
                fake_d = g(z)
        self.opt_d.zero_grad(set_to_none=True)
        real_out, fake_out = d(real), d(fake_d)
        loss_d = F.binary_cross_entropy_with_logits(
            real_out, torch.ones_like(real_out)
        ) + F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))
        loss_d.backward()
        self.opt_d.step()
        # G step, D frozen so no D weight gradients are computed
        d.requires_grad_(False)
        if not self.reuse:
            fake = g(torch.randn((self.batch, *self.nz), device=dev))
        self.opt_g.zero_grad(set_to_none=True)
        out = d(fake)
        F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
        self.opt_g.step()
        d.requires_grad_(True)

    def block(self, n: int) -> list[float]:
        """Seconds of each of ``n`` steps."""
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.step()
            sync(self.data.device)
            out.append(time.perf_counter() - t)
        return out


def framework_block(trainer, n: int) -> list[float]:
    """Seconds of each of ``n`` Trainer steps, taken between consecutive step ends inside one
    ``fit()`` (so the periodic logging counts; fit's setup and its final save do not)."""
    stamps: list[float] = []

    class Stamp(Callback):  # after the other callbacks, so the periodic logging and saves count
        def on_step_end(self, trainer):
            sync(trainer.device)
            stamps.append(time.perf_counter())

    trainer.callbacks.append(stamp := Stamp())
    trainer.settings.max_steps = trainer.step + n + 1
    trainer.fit()
    trainer.callbacks.remove(stamp)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _pct(values: list[float], q: int) -> float:
    return sorted(values)[len(values) * q // 100]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=25, help="steps per loop per round")
    ap.add_argument("--repeats", type=int, default=6, help="rounds; the loops alternate within each")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--write", type=Path, help="replace the bench section of this markdown file")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the recipe, e.g. data.batch_size=128")
    args = ap.parse_args()

    cfg = compose_config(
        "+experiment=dcgan", f"trainer.device={args.device}", "trainer.progress_bar=false", *args.overrides
    )
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build(cfg, run_dir)
        model = trainer.model
        g0, d0 = copy.deepcopy(model.g), copy.deepcopy(model.d)
        data = trainer.data.images  # (N, C, R, R) on the device: the stream's in-memory tensor
        assert isinstance(data, torch.Tensor), "the benchmark needs an in-memory dataset (data.in_memory=true)"
        opt = cfg.optim.g

        def handwritten(reuse_fakes: bool) -> Handwritten:
            g, d = copy.deepcopy(g0), copy.deepcopy(d0)
            betas = tuple(opt.optimizer.betas)
            return Handwritten(g, d, data, cfg.data.batch_size, opt.lr, betas, reuse_fakes=reuse_fakes)

        loops = {
            "gantrain Trainer": lambda n: framework_block(trainer, n),
            "hand-written loop": handwritten(reuse_fakes=False).block,
            "hand-written, fakes reused (info)": handwritten(reuse_fakes=True).block,
        }
        for fn in loops.values():
            fn(args.warmup)
        times: dict[str, list[float]] = {k: [] for k in loops}  # ms of every timed step
        names = list(loops)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
                times[name] += [t * 1000 for t in loops[name](args.steps)]
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = mean["gantrain Trainer"] / mean["hand-written loop"]
    threads = torch.get_num_threads()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} logical CPUs ({threads} torch threads), "
        f"Python {platform.python_version()}, torch {torch.__version__}, device {args.device}"
    )
    if args.device.startswith("cuda"):
        machine += f" ({torch.cuda.get_device_name()})"
    lines = [
        f"DCGAN recipe (`+experiment=dcgan {' '.join(args.overrides)}`), batch {cfg.data.batch_size}, "
        f"{cfg.model.resolution} px; {args.repeats} rounds, each timing {args.steps} steps of every loop "
        f"({args.repeats * args.steps} steps per loop):",
        "",
        "| loop | mean ms/step | median | p10 | p90 |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {k} | {mean[k]:.1f} | {med[k]:.1f} | {_pct(v, 10):.1f} | {_pct(v, 90):.1f} |" for k, v in times.items()],
        "",
        f"**Framework overhead: {100 * (ratio - 1):+.1f}%** (mean Trainer / mean hand-written = {ratio:.3f}).",
        "",
        f"Machine: {machine}.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        replace_marked_section(args.write, "bench.py", report)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
