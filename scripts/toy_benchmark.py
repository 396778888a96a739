"""The 2-D mixture benchmark: every toy recipe x {ring8, grid25} x 3 seeds, modes covered and % high quality.

    python scripts/toy_benchmark.py                          # all runs, CPU, prints the table
    python scripts/toy_benchmark.py --write docs/benchmarks.md
    python scripts/toy_benchmark.py --recipes toy_gan --data ring8 --seeds 0 -- trainer.max_steps=500

Each run goes through the real entry point (``gantrain.train.train``) with the recipe unchanged
except ``seed`` and the ``--`` overrides, into ``outputs/toy_benchmark/<timestamp>/<recipe>_<data>_s<seed>``
(TensorBoard logs, scatter plots under samples/). The metric is the recipe's final evaluation
(2,500 generator samples from fixed noise): a sample is high quality within 3 std of its nearest
mode; a mode is covered if it is the nearest mode of at least one high-quality sample.
CPU minutes are this process's CPU time (all threads) per run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import torch

from gantrain.files import replace_marked_section
from gantrain.train import compose_config, train

# Published (modes, % high quality) for comparison: Lin et al. 2018 (PacGAN), Table 1/2, and
# Elfeki et al. 2019 (GDPP). Their grid/ring use the same mode layout and the 3-std rule.
PUBLISHED = {
    "grid25": [("WGAN-GP", 24.2, 28.7), ("VEEGAN", 24.6, 40.0), ("GDPP", 24.8, 68.5), ("PacGAN4", 24.8, 93.6)],
    "ring8": [("WGAN-GP", 6.8, 59.6), ("VEEGAN", 8.0, 52.9), ("PacGAN2", 7.9, 95.6)],
}


def run_one(recipe: str, data: str, seed: int, out: Path, overrides: list[str], threads: int = 0) -> dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    cfg = compose_config(
        f"+experiment={recipe}", f"data={data}", f"seed={seed}", "trainer.progress_bar=false", *overrides
    )
    cpu0, wall0 = time.process_time(), time.perf_counter()
    metrics = train(cfg, out / f"{recipe}_{data}_s{seed}")
    return {
        "modes": metrics["toy/modes"],
        "hq": metrics["toy/hq"],
        "cpu_min": (time.process_time() - cpu0) / 60,
        "wall_min": (time.perf_counter() - wall0) / 60,
        "steps": metrics["step"],
    }


def table(
    results: dict[tuple[str, str], list[dict[str, float]]], seeds: list[int], overrides: list[str], jobs: int
) -> str:
    lines = [
        f"Measured {datetime.now():%Y-%m-%d} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {jobs} run(s) at a time, CPU, torch {torch.__version__}; "
        f"seeds {', '.join(map(str, seeds))}" + (f"; overrides `{' '.join(overrides)}`" if overrides else "") + ".",
        "",
        "| recipe | data | modes (mean) | % HQ (mean) | per seed (modes / % HQ) | CPU min per run | wall min per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for (recipe, data), runs in results.items():
        per_seed = ", ".join(f"{r['modes']:.0f} / {r['hq']:.1f}" for r in runs)
        lines.append(
            f"| `{recipe}` | `{data}` | {statistics.mean(r['modes'] for r in runs):.1f} | "
            f"{statistics.mean(r['hq'] for r in runs):.1f} | {per_seed} | "
            f"{statistics.mean(r['cpu_min'] for r in runs):.1f} | {statistics.mean(r['wall_min'] for r in runs):.1f} |"
        )
    lines += ["", "Published, for comparison (modes / % HQ):", ""]
    for data in sorted({d for _, d in results}):
        lines.append(f"- `{data}`: " + "; ".join(f"{n} {m} / {h}" for n, m, h in PUBLISHED.get(data, [])))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["toy_gan", "toy_wgan_gp"])
    ap.add_argument("--data", nargs="+", default=["ring8", "grid25"], choices=["ring8", "grid25"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("outputs/toy_benchmark") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}")
    ap.add_argument("--write", type=Path, help="replace the toy_benchmark section of this markdown file")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel, each with cores/jobs torch threads")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (after --)")
    args = ap.parse_args()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    runs = [(r, d, s) for r in args.recipes for d in args.data for s in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, r, d, s, args.out, args.overrides, threads) for r, d, s in runs]
        for (recipe, data, seed), future in zip(runs, futures):
            r = future.result()
            results.setdefault((recipe, data), []).append(r)
            print(
                f"{recipe} {data} seed {seed}: {r['modes']:.0f} modes, {r['hq']:.1f}% HQ, "
                f"{r['cpu_min']:.1f} CPU min, {r['wall_min']:.1f} min",
                file=sys.stderr,
                flush=True,
            )
    report = table(results, args.seeds, args.overrides, args.jobs)
    print(report)
    if args.write:
        replace_marked_section(args.write, "toy_benchmark.py", report)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
