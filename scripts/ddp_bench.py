"""Data-parallel step cost: 1 process against ``torchrun --nproc_per_node=2`` on the same machine.

    python scripts/ddp_bench.py                          # dcgan, 40 steps, batch 32 per rank
    python scripts/ddp_bench.py --write docs/benchmarks.md

Each side trains ``+experiment=NAME data.batch_size=B`` in its own process(es), built by
``gantrain.build.build`` as ``python -m gantrain`` builds it, and times every step of the counting
phase (rank 0's ``on_step_end`` clock); ms/step is the median after the first 10 steps, images/s is
``ranks x B / step time``. Every process runs ``--threads`` intra-op threads (default 1: on a busy
machine a 2-thread process spends its time waiting for a descheduled thread, which measures the load,
not the step), so 2 ranks use up to twice the cores of 1 process, as 2 GPUs are twice the devices.
On a machine with as few cores as this one's, both sides also share them with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gantrain import distributed  # noqa: E402
from gantrain.build import build  # noqa: E402
from gantrain.events import Callback  # noqa: E402
from gantrain.files import replace_marked_section  # noqa: E402
from gantrain.train import compose_config  # noqa: E402

WARMUP = 10  # steps left out of the median (allocator, DDP's bucket rebuild after the first step)


class StepClock(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, trainer) -> None:
        self.times.append(time.perf_counter())


def worker(out: str, overrides: list[str]) -> None:
    """One rank (or the one process): train and write rank 0's step times to ``out``."""
    group = distributed.init_from_env("cpu")
    cfg = compose_config(*overrides)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # rank 0's is the run directory
        run_dir = distributed.shared_run_dir(group, tmp)
        trainer = build(cfg, run_dir, group)
        clock = StepClock()
        trainer.callbacks.append(clock)
        trainer.fit()
    if group.is_main:
        gaps = [b - a for a, b in zip(clock.times[WARMUP:], clock.times[WARMUP + 1 :])]
        Path(out).write_text(json.dumps({"seconds_per_step": median(gaps), "world_size": group.world_size}))
    distributed.shutdown()


def side(ranks: int, overrides: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        script = [str(Path(__file__).resolve()), "--worker", str(out), *overrides]
        if ranks == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script]
        subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="dcgan")
    ap.add_argument("--batch", type=int, default=32, help="data.batch_size: per rank")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, in alternating order; the median")
    ap.add_argument("--write", help="markdown file whose ddp_bench.py section gets the table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.worker:
        return worker(args.worker, overrides)
    overrides = [
        f"+experiment={args.recipe}",
        f"data.batch_size={args.batch}",
        f"trainer.max_steps={args.steps}",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        *overrides,
    ]
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(args.rounds):  # the order alternates, so drift in the machine's load hits both sides
        for ranks in (1, 2) if round_ % 2 == 0 else (2, 1):
            seconds[ranks].append(side(ranks, overrides, args.threads)["seconds_per_step"])
            print(f"{ranks} rank(s): {1000 * seconds[ranks][-1]:.0f} ms/step", file=sys.stderr)
    end_load = os.getloadavg()[0]
    rows = [(n, args.threads, 1000 * median(s), n * args.batch / median(s)) for n, s in seconds.items()]
    lines = [
        f"`python scripts/ddp_bench.py` ({args.recipe}, data.batch_size={args.batch} per rank, {args.steps} steps, "
        f"median ms per step after {WARMUP}, median of {args.rounds} runs per side in alternating order; CPU, "
        f"{cores} cores, torch {torch.__version__}, load average {load:.1f} when it started, {end_load:.1f} at "
        "the end):",
        "",
        "| processes | threads each | effective batch | ms/step | images/s |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {n} | {t} | {n * args.batch} | {ms:.0f} | {ips:.0f} |" for n, t, ms, ips in rows],
        "",
        "The caveat: this machine has 2 cores shared with other work (a load average far above 2 means several "
        "processes waiting for each core), so both sides measure mostly how much CPU the load left them, and the "
        "2 ranks also compete with each other; with 2 ranks doing twice the images per step, the figures bound "
        "nothing about the data-parallel machinery's own cost (gloo all-reduce, the per-step stop agreement, "
        "buffer broadcasts), and say nothing about 2 GPUs, where each rank has its own device.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        replace_marked_section(args.write, "ddp_bench.py", report)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
