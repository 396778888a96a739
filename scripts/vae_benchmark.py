"""VAE benchmark: held-out importance-weighted NLL on MNIST, in nats, and the CPU time to get there.

Protocol (docs/benchmarks.md): the 10,000 real MNIST test images from IDX files (default
../shared/data/mnist-t10k), the first 8,000 for training and the last 2,000 held out, dynamic
binarization while training, the held-out images binarized once with a fixed seed, the NLL
estimated with the IWAE bound at k=500 importance samples.

    python scripts/vae_benchmark.py --write docs/benchmarks.md
    python scripts/vae_benchmark.py --runs vae_mlp "vae_mlp_deep:+experiment=vae_mlp model.g.encoder.hidden=[512,256]"

A run is ``NAME`` (the experiment of that name) or ``NAME:OVERRIDES`` (a label, then the overrides,
which must include ``+experiment=...``). Extra overrides after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import torch

from gantrain import elbo
from gantrain.files import replace_marked_section

REPO = Path(__file__).resolve().parents[1]

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist-t10k"
DEFAULT_RUNS = ["vae_mlp", "vae_mnist"]
REFERENCE = (
    "A hand-written 784-400-40 MLP VAE (Adam 1e-3, batch 100, 100 epochs, ~100 s on 2 cores) reaches 98.6 nats "
    "on this protocol; the published 60k-image figure for that architecture is about 89.8."
)


def protocol(data_root: Path) -> list[str]:
    return [
        "data=mnist",
        f"data.root={data_root}",
        "data.split=test",
        "data.download=false",
        "data.holdout=2000",
        "data.binarize=dynamic",
        "data.channels=1",
        "model.resolution=28",
        "trainer.progress_bar=false",
    ]


def parse_run(spec: str) -> tuple[str, list[str]]:
    name, sep, rest = spec.partition(":")
    return (name, rest.split()) if sep else (name, [f"+experiment={name}"])


def run_one(name: str, overrides: list[str], out: Path, k: int, threads: int) -> dict[str, float]:
    """Train one recipe in this (spawned) process, then evaluate it; CPU times are this process's."""
    if threads:
        torch.set_num_threads(threads)
    from gantrain.sampling import load_model
    from gantrain.train import compose_config, train

    cfg = compose_config(*overrides)
    run_dir = out / name
    cpu0, wall0 = time.process_time(), time.perf_counter()
    metrics = train(cfg, run_dir)
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0

    from hydra.utils import instantiate

    model = load_model(run_dir / "checkpoints" / "last.ckpt", "cpu")  # EMA weights when the run kept them
    heldout = instantiate(cfg.data).heldout()
    cpu1 = time.process_time()
    result = elbo.evaluate_nll(
        model.g,
        heldout.split(100),
        k=k,
        chunk=100,
        log_likelihood=elbo.likelihood_of_loss(cfg.loss),
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    return {
        "nll": result["nll_iwae"],
        "elbo": result["elbo"],
        "train_loss_elbo": metrics.get("elbo", float("nan")),
        "steps": metrics["step"],
        "train_cpu_min": train_cpu / 60,
        "train_wall_min": train_wall / 60,
        "eval_cpu_min": (time.process_time() - cpu1) / 60,
        "images": result["images"],
    }


def table(rows: list[tuple[str, list[str], dict[str, float]]], k: int, jobs: int, threads: int) -> str:
    lines = [
        f"Measured {datetime.now():%Y-%m-%d} on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jobs} run(s) at a time with {threads or torch.get_num_threads()} torch thread(s) each, CPU, "
        f"torch {torch.__version__}. NLL: IWAE bound with k={k} on the 2,000 held-out images (binarized once, "
        "fixed seed). CPU minutes are the training process's own CPU time (all its threads).",
        "",
        "| run | overrides | held-out NLL (nats) | held-out ELBO (nats) | steps | train CPU min | train wall min "
        "| eval CPU min |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, overrides, r in rows:
        lines.append(
            f"| `{name}` | `{' '.join(overrides)}` | {r['nll']:.2f} | {r['elbo']:.2f} | {r['steps']:.0f} | "
            f"{r['train_cpu_min']:.1f} | {r['train_wall_min']:.1f} | {r['eval_cpu_min']:.1f} |"
        )
    lines += ["", REFERENCE]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="NAME or NAME:OVERRIDES (default: %(default)s)")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="folder with raw/t10k-*-idx*-ubyte.gz")
    ap.add_argument("--k", type=int, default=500, help="importance samples for the NLL (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("outputs/vae_benchmark") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}")
    ap.add_argument("--write", type=Path, help="replace the vae_benchmark section of this markdown file")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run (after --)")
    args = ap.parse_args()
    if not (args.data_root / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        ap.error(f"--data-root {args.data_root}: no raw/t10k-images-idx3-ubyte.gz there (the MNIST test set IDX files)")
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    runs = [parse_run(s) for s in args.runs]
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                run_one,
                name,
                [*protocol(args.data_root.resolve()), *o, *args.overrides],
                args.out,
                args.k,
                args.threads,
            )
            for name, o in runs
        ]
        for (name, o), future in zip(runs, futures):
            r = future.result()
            rows.append((name, [*o, *args.overrides], r))
            print(
                f"{name}: NLL {r['nll']:.2f} nats, ELBO {r['elbo']:.2f}, {r['train_cpu_min']:.1f} CPU min training",
                file=sys.stderr,
                flush=True,
            )
    report = table(rows, args.k, args.jobs, args.threads)
    print(report)
    if args.write:
        replace_marked_section(args.write, "vae_benchmark.py", report)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
