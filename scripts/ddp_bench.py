"""Data-parallel step cost: 1 process against ``torchrun --nproc_per_node=2`` on the same machine.

    python scripts/ddp_bench.py                          # dcgan, 40 steps, batch 32 per rank
    python scripts/ddp_bench.py --write docs/benchmarks.md

Each side trains ``+experiment=NAME data.batch_size=B`` in its own process(es), built by
``gantrain.train.build`` as ``python -m gantrain`` builds it, and times every step of the counting
phase (rank 0's ``on_step_end`` clock); ms/step is the median after the first 10 steps, images/s is
``ranks x B / step time``. The two sides get the same cores: the 1-process side runs with
``OMP_NUM_THREADS`` = all of them, each of the 2 ranks with half. On a machine with fewer cores
than a GPU node has GPUs this measures the gloo all-reduce and the per-step rank agreement on top of
compute that the ranks share, not a speed-up.
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
from gantrain.events import Callback  # noqa: E402
from gantrain.files import replace_marked_section  # noqa: E402
from gantrain.train import build, compose_config  # noqa: E402

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
    rows = []
    for ranks in (1, 2):
        r = side(ranks, overrides, max(cores // ranks, 1))
        ms = 1000 * r["seconds_per_step"]
        rows.append((ranks, max(cores // ranks, 1), ms, ranks * args.batch / r["seconds_per_step"]))
        print(f"{ranks} rank(s): {ms:.0f} ms/step, {rows[-1][3]:.0f} images/s", file=sys.stderr)
    lines = [
        f"`python scripts/ddp_bench.py` ({args.recipe}, data.batch_size={args.batch} per rank, {args.steps} steps, "
        f"median ms per step after {WARMUP}; CPU, {cores} cores, torch {torch.__version__}, load average "
        f"{load:.1f} when it started):",
        "",
        "| processes | threads each | effective batch | ms/step | images/s |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {n} | {t} | {n * args.batch} | {ms:.0f} | {ips:.0f} |" for n, t, ms, ips in rows],
        "",
        "The caveat: both sides share this machine's cores, so 2 ranks here do twice the work per step on the "
        "same CPU; the table shows what the data-parallel machinery (gloo all-reduce, the per-step stop "
        "agreement, buffer broadcasts) costs on top of that compute, not the speed-up of 2 GPUs, where each "
        "rank has its own device.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        replace_marked_section(args.write, "ddp_bench.py", report)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
