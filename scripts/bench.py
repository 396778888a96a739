"""Step cost as a user feels it: ``python -m gantrain`` against hand-written pytorch/examples-style loops.

    python scripts/bench.py                        # dcgan, wgan_gp and vae, 3 rounds each, then the detail
    python scripts/bench.py --recipes dcgan --rounds 5
    python scripts/bench.py --write docs/benchmarks.md

Headline, per recipe: the whole ``python -m gantrain +experiment=NAME data=digits trainer.max_steps=N``
process at its default settings (logging every 10 steps into TensorBoard and plain progress lines, the final
sample grid and checkpoint) against the whole ``python scripts/hand_loops.py NAME --steps N`` process
(:mod:`hand_loops`: the same networks, optimizer settings, batch and data, the losses printed every 10 steps;
only dcgan's learning rate differs, which does not change a step's cost). The time per step is the difference
between a long and a short run's wall time over the difference in steps, so start-up, data loading and the
final save cancel: 20 and 120 steps for dcgan, 20 and 60 for wgan_gp and 20 and 420 for vae (each difference
15-20 s of training on a 2-core CPU, well above the start-up's jitter). One round runs every process of a
recipe, in an order that rotates every round so that drift in the machine's load hits all sides; each side's
time per step is the median over the rounds and the ratio is gantrain's over the hand loop's.

``python -m gantrain`` keeps freed memory for the next step (:mod:`gantrain.allocator`); a third,
informational side runs the hand loop with the same glibc settings (through glibc's environment
variables), so what the framework costs apart from that is in the table too.

Detail (dcgan, one process with gantrain's allocator settings): the Trainer, the hand loop and the
Trainer with ``loss.reuse_fakes=false`` timed step by step in alternating blocks on the same weights
and the same in-memory data.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean, median

import hand_loops
import torch
from hydra.utils import instantiate

from gantrain import allocator
from gantrain.build import build
from gantrain.events import Callback
from gantrain.files import replace_marked_section
from gantrain.train import compose_config

REPO = Path(__file__).resolve().parents[1]
STEPS = {"dcgan": (20, 120), "wgan_gp": (20, 60), "vae": (20, 420)}  # (short, long) run of each recipe
SIDES = ("gantrain", "hand", "hand, gantrain's allocator")
# what allocator.keep_freed_memory() sets, in the form glibc reads at start-up
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- whole processes
def command(side: str, recipe: str, steps: int, run_dir: Path, device: str | None) -> list[str]:
    """One process of a measurement: gantrain at its defaults, or the hand loop."""
    if side == "gantrain":
        gantrain = [sys.executable, "-m", "gantrain", f"+experiment={recipe}", "data=digits"]
        gantrain += [f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"]
        return gantrain + ([f"trainer.device={device}"] if device else [])
    hand = [sys.executable, str(Path(hand_loops.__file__)), recipe, "--steps", str(steps)]
    return hand + (["--device", device] if device else [])


def wall_time(command: list[str], log: Path, env: dict[str, str]) -> float:
    """Seconds the whole process takes, its output (not a terminal, as on a cluster) in ``log``."""
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        start = time.perf_counter()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, env=env)
        seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"bench.py: {' '.join(command)} exited with {done.returncode}; its output: {log}")
    return seconds


def same_networks(recipe: str) -> None:
    """The hand loop's networks have the recipe's parameter shapes (what a step computes is the same)."""
    cfg = compose_config(f"+experiment={recipe}", "data=digits")
    model = instantiate(cfg.model)
    hand = hand_loops.LOOPS[recipe](hand_loops.digits()[:1])
    for name, net in hand.networks().items():
        want = [tuple(p.shape) for p in getattr(model, name).parameters()]
        assert [tuple(p.shape) for p in net.parameters()] == want, f"{recipe}: the hand loop's {name} differs"


def whole_processes(
    recipe: str, steps: tuple[int, int], rounds: int, device: str | None, work: Path
) -> dict[str, list[float]]:
    """ms per step of each side in each round (long run minus short run, per step)."""
    short, long = steps
    runs = [(side, n) for n in (short, long) for side in SIDES]
    per_step: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(rounds):
        seconds = {}
        for side, n in runs[r % len(runs) :] + runs[: r % len(runs)]:  # rotate who goes first
            run_dir = work / f"{recipe}_{SIDES.index(side)}_{n}_{r}"
            run_dir.mkdir()
            env = ALLOCATOR_ENV if side == SIDES[2] else {}
            seconds[side, n] = wall_time(command(side, recipe, n, run_dir, device), run_dir / "out.log", env)
        for side in per_step:
            per_step[side].append(1000 * (seconds[side, long] - seconds[side, short]) / (long - short))
        print(f"{recipe} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} ms/step" for k, v in per_step.items()))
    return per_step


# ----------------------------------------------------------------------------- in one process (detail)
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


def hand_block(loop, device: torch.device):
    def block(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            loop.step(loop.i)
            loop.i += 1
            sync(device)
            out.append(time.perf_counter() - t)
        return out

    return block


def in_process(rounds: int, steps: int, warmup: int, device: str | None, work: Path) -> dict[str, list[float]]:
    """ms of every timed dcgan step of the Trainer, the hand loop and the Trainer without reuse."""
    overrides = ["+experiment=dcgan", "data=digits", "trainer.progress_bar=false"]
    overrides += [f"trainer.device={device}"] if device else []
    trainer = build(compose_config(*overrides), work / "trainer")
    fresh = build(compose_config(*overrides, "loss.reuse_fakes=false"), work / "fresh")
    fresh.model.load_state_dict(trainer.model.state_dict())
    loop = hand_loops.DCGAN(trainer.data.images, log=lambda line: None)  # the stream's in-memory tensor
    loop.g.load_state_dict(copy.deepcopy(trainer.model.g.state_dict()))
    loop.d.load_state_dict(copy.deepcopy(trainer.model.d.state_dict()))
    loop.i = 0
    loops = {
        "gantrain Trainer": lambda n: framework_block(trainer, n),
        "hand loop": hand_block(loop, trainer.device),
        "Trainer, loss.reuse_fakes=false (info)": lambda n: framework_block(fresh, n),
    }
    for fn in loops.values():
        fn(warmup)
    times: dict[str, list[float]] = {k: [] for k in loops}
    names = list(loops)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name] += [t * 1000 for t in loops[name](steps)]
        print(f"in-process round {r + 1}/{rounds} done", file=sys.stderr)
    return times


def _pct(values: list[float], q: int) -> float:
    return sorted(values)[len(values) * q // 100]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(STEPS), choices=list(STEPS))
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the four whole processes of each recipe")
    ap.add_argument("--steps", type=int, nargs=2, metavar=("SHORT", "LONG"), help="the runs' steps, every recipe")
    ap.add_argument("--device", help="trainer.device / the hand loop's device (default: each one's own choice)")
    ap.add_argument("--detail-rounds", type=int, default=4, help="in-process rounds (0: skip the detail)")
    ap.add_argument("--detail-steps", type=int, default=20, help="steps per loop per in-process round")
    ap.add_argument("--write", type=Path, help="replace the bench section of this markdown file")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    allocator.keep_freed_memory()  # the detail runs in this process: the allocator python -m gantrain has
    for recipe in args.recipes:
        same_networks(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = {recipe: tuple(args.steps or STEPS[recipe]) for recipe in args.recipes}
        per_step = {r: whole_processes(r, steps[r], args.rounds, args.device, work) for r in args.recipes}
        times = in_process(args.detail_rounds, args.detail_steps, 3, args.device, work) if args.detail_rounds else {}
    load_after = os.getloadavg()[0]

    threads = torch.get_num_threads()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} logical CPUs ({threads} torch threads), "
        f"Python {platform.python_version()}, torch {torch.__version__}, device {device}"
    )
    if device.startswith("cuda"):
        machine += f" ({torch.cuda.get_device_name()})"
    command = "python scripts/bench.py " + " ".join(sys.argv[1:])
    lines = [
        f"`{command.strip()}`: {args.rounds} rounds; ms per step of the whole process = (wall time of the long run "
        "- wall time of the short run) / (step difference), median over the rounds; ratio = gantrain / hand loop.",
        "",
        "| recipe | steps (short, long) | `python -m gantrain` ms/step | hand loop ms/step | ratio | ratio per round "
        "| info: hand loop with gantrain's allocator settings, ms/step | gantrain / it |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for recipe, sides in per_step.items():
        g, h, a = (median(sides[side]) for side in SIDES)
        rounds = ", ".join(f"{x / y:.3f}" for x, y in zip(sides["gantrain"], sides["hand"]))
        lines.append(
            f"| {recipe} | {steps[recipe]} | {g:.1f} | {h:.1f} | **{g / h:.3f}** | {rounds} | {a:.1f} | {g / a:.3f} |"
        )
    if times:
        ratio = fmean(times["gantrain Trainer"]) / fmean(times["hand loop"])
        lines += [
            "",
            f"Detail, dcgan in one process with gantrain's allocator settings ({args.detail_rounds} rounds of "
            f"{args.detail_steps} steps of each loop, alternating):",
            "",
            "| loop | mean ms/step | median | p10 | p90 |",
            "| --- | ---: | ---: | ---: | ---: |",
            *[
                f"| {k} | {fmean(v):.1f} | {median(v):.1f} | {_pct(v, 10):.1f} | {_pct(v, 90):.1f} |"
                for k, v in times.items()
            ],
            "",
            f"Mean Trainer / mean hand loop in one process: {ratio:.3f}.",
        ]
    lines += ["", f"Machine: {machine}; load average (1 min) {load_before:.2f} before, {load_after:.2f} after."]
    report = "\n".join(lines)
    print(report)
    if args.write:
        replace_marked_section(args.write, "bench.py", report)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
