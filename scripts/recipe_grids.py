"""Train each image recipe for a fixed number of steps and put its last sample grid into the docs.

    python scripts/recipe_grids.py --data-path ../shared/data/mnist-t10k/png --steps 1000
    python scripts/recipe_grids.py --recipes wgan lsgan --steps 600 --write docs/benchmarks.md

Each recipe runs through the real entry point with ``data=folder data.path=... data.channels=1``,
``trainer.max_steps=--steps`` (per recipe with ``--steps-for NAME=N``) and nothing else changed,
into ``outputs/recipe_grids/<timestamp>/<recipe>``. The last grid is copied to
``docs/img/<recipe>_mnist_step<N>.png`` and a table (steps, wall minutes, images/s, final losses,
NaN check) replaces the ``recipe_grids.py`` section of the ``--write`` file.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from gantrain.files import replace_marked_section
from gantrain.train import compose_config, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["dcgan", "wgan_gp", "wgan", "hinge_sngan", "lsgan"])
    ap.add_argument("--data-path", type=Path, default=REPO.parent / "shared" / "data" / "mnist-t10k" / "png")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--steps-for", nargs="*", default=[], metavar="NAME=N", help="per-recipe step counts")
    ap.add_argument("--out", type=Path, default=Path("outputs/recipe_grids") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}")
    ap.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--write", type=Path, help="replace the recipe_grids.py section of this markdown file")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (after --)")
    args = ap.parse_args()
    if not args.data_path.is_dir():
        sys.exit(f"--data-path {args.data_path}: not a folder of images (the MNIST PNGs: mnist-t10k/png)")
    steps_for = {k: int(v) for k, v in (s.split("=", 1) for s in args.steps_for)}
    rows, images = [], []
    for recipe in args.recipes:
        steps = steps_for.get(recipe, args.steps)
        cfg = compose_config(
            f"+experiment={recipe}",
            "data=folder",
            f"data.path={args.data_path.resolve()}",
            "data.channels=1",
            f"trainer.max_steps={steps}",
            f"trainer.sample_every_n_steps={steps}",
            "trainer.progress_bar=false",
            *args.overrides,
        )
        run_dir = args.out / recipe
        t0 = time.perf_counter()
        metrics = train(cfg, run_dir)
        minutes = (time.perf_counter() - t0) / 60
        grid = args.img_dir / f"{recipe}_mnist_step{steps}.png"
        grid.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "samples" / f"step_{steps:07d}.png", grid)
        finite = all(math.isfinite(v) for v in metrics.values())
        rows.append(
            f"| `{recipe}` | {steps} | {minutes:.1f} | {metrics['perf/images_per_s']:.0f} | "
            f"{metrics['loss/D']:.3g} | {metrics['loss/G']:.3g} | {'yes' if finite else '**NaN/inf**'} |"
        )
        images.append(f"`{recipe}`, step {steps}:\n\n![{recipe}]({Path('img') / grid.name})")
        print(rows[-1], file=sys.stderr, flush=True)
    report = "\n".join(
        [
            f"Measured {datetime.now():%Y-%m-%d} on {platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"CPU, torch {torch.__version__}; `data=folder` on the 10,000 MNIST test PNGs, `data.channels=1`, "
            "each recipe otherwise unchanged" + (f" except `{' '.join(args.overrides)}`." if args.overrides else "."),
            "",
            "| recipe | steps | wall min | images/s | final loss/D | final loss/G | all stats finite |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            *[x + "\n" for x in images],
        ]
    )
    print(report)
    if args.write:
        replace_marked_section(args.write, "recipe_grids.py", report)


if __name__ == "__main__":
    main()
