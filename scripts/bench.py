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

Speed switches (``--compile``: off and on; ``--switches``: each of :data:`SWITCHES` alone and all together): per
recipe, one fresh process per (side, setting) builds the Trainer (or the hand loop with the same switches,
``hand_loops.speed_up``), and reports the seconds to the end of the first step (compilation happens there) and
the ms/step and real images/s of the next ``--switch-steps`` steps. ``--channels-last``, ``--matmul-precision``
and ``--precision`` set a switch for every process the script starts (the headline's too).

    python scripts/bench.py --compile --rounds 0 --detail-rounds 0              # CPU: compile off/on per recipe
    python scripts/bench.py --device cuda --switches --rounds 0 --detail-rounds 0  # GPU: every switch off/on
    python scripts/bench.py --conditional --recipes dcgan --rounds 0 --detail-rounds 0  # labels: cgan_pd's cost

``--conditional``: cgan_pd's whole process against the same with ``model.conditional=false`` (the same ResNets with
BatchNorm instead of conditional BatchNorm and no projection), long run minus short run, in rounds as above.
``--augment``: dcgan's whole process with ``augment=diffaugment`` against ``augment=none`` (the recipe as shipped),
the same way (issue 24: DiffAugment adds at most 15% to a dcgan step on the CPU); ``--ada`` likewise with
``augment=ada``.

    python scripts/bench.py --augment --recipes dcgan --rounds 0 --detail-rounds 0  # DiffAugment's cost
    python scripts/bench.py --ada --recipes dcgan --rounds 0 --detail-rounds 0      # ADA's cost

Detail (dcgan, one process with gantrain's allocator settings): the Trainer, the hand loop and the
Trainer with ``loss.reuse_fakes=false`` timed step by step in alternating blocks on the same weights
and the same in-memory data.
"""

from __future__ import annotations

import argparse
import copy
import json
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
VARIANTS = {  # --conditional, --augment: (recipe, (short, long) steps, {side: overrides}, what the table shows)
    "conditional": (
        "cgan_pd",
        (20, 120),
        {"conditional": [], "unconditional": ["model.conditional=false"]},
        "Labels' cost: the recipe as shipped against the same networks with `model.conditional=false` (plain "
        "BatchNorm, no projection, no label embedding); the issue's bound: a ratio of at most 1.10.",
    ),
    "augment": (
        "dcgan",
        (20, 120),
        {"diffaugment": ["augment=diffaugment"], "none": []},
        "DiffAugment's cost: the recipe with `augment=diffaugment` (color, translation, cutout on every D input) "
        "against the recipe as shipped (`augment=none`); the issue's bound: a ratio of at most 1.15.",
    ),
    "ada": (
        "dcgan",
        (20, 120),
        {"ada": ["augment=ada"], "none": []},
        "ADA's cost: the recipe with `augment=ada` as shipped (every op of the pipeline on every D input, p adjusted "
        "every 4 D steps) against the recipe as shipped (`augment=none`).",
    ),
}
SIDES = ("gantrain", "hand", "hand, gantrain's allocator")
# what allocator.keep_freed_memory() sets, in the form glibc reads at start-up
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD),
}


# --switches: name -> (gantrain overrides, hand loop options); the first is the baseline
SWITCHES = {  # the ones that compile last: a run cut short by a time limit still has the others
    "off": ([], []),
    "channels_last": (["trainer.channels_last=true"], ["--channels-last"]),
    "matmul high": (["trainer.matmul_precision=high"], ["--matmul-precision", "high"]),
    "bf16-mixed": (["trainer.precision=bf16-mixed"], ["--precision", "bf16-mixed"]),
    "compile": (["trainer.compile=default"], ["--compile", "default"]),
    "all: compile, channels_last, high, bf16": (
        [
            "trainer.compile=default",
            "trainer.channels_last=true",
            "trainer.matmul_precision=high",
            "trainer.precision=bf16-mixed",
        ],
        ["--compile", "default", "--channels-last", "--matmul-precision", "high", "--precision", "bf16-mixed"],
    ),
    "compile reduce-overhead": (["trainer.compile=reduce-overhead"], ["--compile", "reduce-overhead"]),
}
COMPILE_ONLY = ("off", "compile")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- whole processes
BASE: tuple[list[str], list[str]] = ([], [])  # --channels-last/--matmul-precision/--precision: (overrides, options)


def command(side: str, recipe: str, steps: int, run_dir: Path, device: str | None) -> list[str]:
    """One process of a measurement: gantrain at its defaults, or the hand loop."""
    if side == "gantrain":
        gantrain = [sys.executable, "-m", "gantrain", f"+experiment={recipe}", "data=digits", *BASE[0]]
        gantrain += [f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"]
        return gantrain + ([f"trainer.device={device}"] if device else [])
    hand = [sys.executable, str(Path(hand_loops.__file__)), recipe, "--steps", str(steps), *BASE[1]]
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


def variant_cost(
    recipe: str, steps: tuple[int, int], rounds: int, device: str | None, work: Path, sides: dict[str, list[str]]
) -> dict[str, list[float]]:
    """ms per step of the recipe under each of ``sides`` (name -> overrides), whole processes, long run minus short
    run, in rotating order."""
    short, long = steps
    runs = [(side, n) for n in (short, long) for side in sides]
    per_step: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(rounds):
        seconds = {}
        for side, n in runs[r % len(runs) :] + runs[: r % len(runs)]:
            run_dir = work / f"{recipe}_{side}_{n}_{r}"
            run_dir.mkdir()
            cmd = command("gantrain", recipe, n, run_dir, device) + sides[side]
            seconds[side, n] = wall_time(cmd, run_dir / "out.log", {})
        for side in per_step:
            per_step[side].append(1000 * (seconds[side, long] - seconds[side, short]) / (long - short))
        print(f"{recipe} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} ms/step" for k, v in per_step.items()))
    return per_step


def variant_table(name: str, rounds: int, device: str | None, work: Path) -> list[str]:
    """The ``VARIANTS[name]`` comparison: measured, then as a table (first side over second side)."""
    recipe, steps, sides, about = VARIANTS[name]
    (work / name).mkdir()  # each comparison its own run folders: two may share a side (none)
    per_step = variant_cost(recipe, steps, rounds, device, work / name, sides)
    first, second = sides
    a, b = median(per_step[first]), median(per_step[second])
    per_round = ", ".join(f"{x / y:.3f}" for x, y in zip(per_step[first], per_step[second]))
    return [
        f"{about} {rounds} rounds, whole processes as above, `data=digits`.",
        "",
        f"| recipe | steps (short, long) | {first} ms/step | {second} ms/step | ratio | ratio per round |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        f"| {recipe} | {steps} | {a:.1f} | {b:.1f} | **{a / b:.3f}** | {per_round} |",
    ]


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


# ----------------------------------------------------------------------------- speed switches
def one_setting(side: str, recipe: str, options: list[str], steps: int, device: str | None, work: Path) -> dict:
    """In this process (``--one``): seconds to the end of the first step, then ms/step and images/s of ``steps``."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if side == "gantrain":
        overrides = [f"+experiment={recipe}", "data=digits", "trainer.progress_bar=false", f"trainer.device={dev}"]
        trainer = build(compose_config(*overrides, *options), work)
        stamps = []

        class Stamp(Callback):
            def on_step_end(self, trainer):
                sync(trainer.device)
                stamps.append(time.perf_counter())

        trainer.callbacks.append(Stamp())
        trainer.settings.max_steps = steps + 1
        start = time.perf_counter()
        trainer.fit()
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--compile")
        ap.add_argument("--channels-last", action="store_true")
        ap.add_argument("--matmul-precision", default="highest")
        ap.add_argument("--precision", default="32")
        opts = ap.parse_args(options)
        if opts.precision not in hand_loops.PRECISIONS:
            return {}  # no hand loop at this precision
        loop = hand_loops.LOOPS[recipe](hand_loops.digits().to(dev), log=lambda line: None)
        hand_loops.speed_up(loop, opts.compile, opts.channels_last, opts.matmul_precision)
        stamps = []
        start = time.perf_counter()
        with hand_loops.autocast(dev, opts.precision):
            for i in range(steps + 1):
                loop.step(i)
                sync(torch.device(dev))
                stamps.append(time.perf_counter())
    # img/s of both sides in the hand loop's unit (gantrain's images_seen also counts the G phase's real batch)
    first, per_step = stamps[0] - start, (stamps[-1] - stamps[0]) / steps
    images = hand_loops.IMAGES_PER_STEP[recipe]
    return {"first_step_s": first, "ms_per_step": 1000 * per_step, "img_per_s": images / per_step}


def switch_table(recipes: list[str], names: tuple[str, ...], steps: int, device: str | None, work: Path) -> list[str]:
    """One fresh process per recipe, setting and side (compiled code and global settings do not carry over)."""
    lines = [
        f"Speed switches: one process per cell; first step = seconds from fit() to the end of the first step "
        f"(compilation included), then the mean of the next {steps} steps; img/s = the recipe's real images per step "
        "in the hand loop (dcgan, vae: a batch of 64; wgan_gp: 5 critic batches) per second, on both sides.",
        "",
        "| recipe | setting | gantrain first step s | gantrain ms/step | gantrain img/s | hand first step s "
        "| hand ms/step | hand img/s | gantrain / hand img/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for recipe in recipes:
        for name in names:
            row = {}
            for i, side in enumerate(("gantrain", "hand")):
                options = [*BASE[i], *SWITCHES[name][i]]
                run = work / f"switch_{recipe}_{list(SWITCHES).index(name)}_{side}"
                cmd = [sys.executable, __file__, "--one", side, recipe, "--switch-steps", str(steps)]
                cmd += ["--work", str(run)]
                cmd += (["--device", device] if device else []) + ["--", *options]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                if done.returncode:
                    print(f"bench.py: {recipe} {name} {side} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    row[side] = {}
                else:
                    row[side] = json.loads(done.stdout.strip().splitlines()[-1])
            g, h = row["gantrain"], row["hand"]
            keys = ("first_step_s", "ms_per_step", "img_per_s")
            cells = [f"{d[k]:.1f}" if k in d else "-" for d in (g, h) for k in keys]
            ratio = f"{g['img_per_s'] / h['img_per_s']:.2f}" if g and h else "-"
            lines.append(f"| {recipe} | {name} | " + " | ".join(cells) + f" | {ratio} |")
            print(f"bench.py: {recipe}, {name}: gantrain {g}, hand {h}", file=sys.stderr, flush=True)
    return lines


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
    ap.add_argument("--tag", default="bench.py", help="the section's marker name (%(default)s)")
    ap.add_argument("--compile", action="store_true", help="table: each recipe with trainer.compile off and on")
    ap.add_argument("--switches", action="store_true", help="table: each speed switch off and on, gantrain and hand")
    ap.add_argument("--conditional", action="store_true", help="table: cgan_pd against its networks unconditional")
    ap.add_argument("--augment", action="store_true", help="table: dcgan with augment=diffaugment against none")
    ap.add_argument("--ada", action="store_true", help="table: dcgan with augment=ada against none")
    ap.add_argument(
        "--label-rounds", type=int, default=3, help="--conditional's, --augment's and --ada's rounds (%(default)s)"
    )
    ap.add_argument("--switch-steps", type=int, default=30, help="steps timed after the first in those tables")
    ap.add_argument("--settings", nargs="+", choices=list(SWITCHES), help="--switches: only these rows")
    ap.add_argument("--channels-last", action="store_true", help="every process: channels_last on")
    ap.add_argument("--matmul-precision", choices=["highest", "high", "medium"], help="every process: this precision")
    ap.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed"], help="every process: trainer.precision")
    ap.add_argument("--one", nargs=2, metavar=("SIDE", "RECIPE"), help=argparse.SUPPRESS)  # a table's cell
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args, options = ap.parse_known_args()
    if args.one:
        side, recipe = args.one
        result = one_setting(side, recipe, [o for o in options if o != "--"], args.switch_steps, args.device, args.work)
        print(json.dumps(result))
        return
    if options:
        ap.error(f"unrecognized arguments: {' '.join(options)}")
    if args.channels_last:
        BASE[0].append("trainer.channels_last=true")
        BASE[1].append("--channels-last")
    if args.matmul_precision:
        BASE[0].append(f"trainer.matmul_precision={args.matmul_precision}")
        BASE[1].extend(["--matmul-precision", args.matmul_precision])
    if args.precision:
        if args.precision not in hand_loops.PRECISIONS and args.rounds:
            ap.error(f"--precision {args.precision}: the hand loops run 32 or bf16-mixed only (a headline compares)")
        BASE[0].append(f"trainer.precision={args.precision}")
        BASE[1].extend(["--precision", args.precision])

    load_before = os.getloadavg()[0]
    allocator.keep_freed_memory()  # the detail runs in this process: the allocator python -m gantrain has
    for recipe in args.recipes:
        same_networks(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = {recipe: tuple(args.steps or STEPS[recipe]) for recipe in args.recipes}
        recipes = args.recipes if args.rounds else []
        per_step = {r: whole_processes(r, steps[r], args.rounds, args.device, work) for r in recipes}
        times = in_process(args.detail_rounds, args.detail_steps, 3, args.device, work) if args.detail_rounds else {}
        names = tuple(args.settings or SWITCHES) if args.switches else COMPILE_ONLY if args.compile else ()
        switches = switch_table(args.recipes, names, args.switch_steps, args.device, work) if names else []
        labels: list[str] = []
        for name in [v for v in VARIANTS if getattr(args, v)]:
            labels += ([""] if labels else []) + variant_table(name, args.label_rounds, args.device, work)
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
    lines = (
        []
        if not per_step
        else [
            f"`{command.strip()}`: {args.rounds} rounds; ms per step of the whole process = (wall time of the long run "
            "- wall time of the short run) / (step difference), median over the rounds; ratio = gantrain / hand loop.",
            "",
            "| recipe | steps (short, long) | `python -m gantrain` ms/step | hand loop ms/step | ratio "
            "| ratio per round | info: hand loop with gantrain's allocator settings, ms/step | gantrain / it |",
            "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
    )
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
    if switches:
        lines += ["", f"`{command.strip()}`:" if not per_step else "", *switches]
    if labels:
        lines += ["", f"`{command.strip()}`:" if not per_step else "", *labels]
    lines += ["", f"Machine: {machine}; load average (1 min) {load_before:.2f} before, {load_after:.2f} after."]
    report = "\n".join(lines)
    print(report)
    if args.write:
        replace_marked_section(args.write, args.tag, report)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
