"""The limited-data benchmark: DCGAN on the first N MNIST test images without augmentation, with DiffAugment, with ADA.

    python scripts/mnist_classifier.py                                  # once: the feature extractor's weights
    python scripts/limited_data.py --write docs/benchmarks.md            # limits 500 and 2,000, 3 seeds, 18,000 steps
    python scripts/limited_data.py --limits 500 --seeds 0 --steps 200    # a quick check of the pipeline

Each (limit, augmentation, seed) trains ``python -m gantrain +experiment=dcgan data=mnist data.limit=LIMIT
augment=AUG seed=SEED trainer.max_steps=STEPS model.g.ngf=WIDTH model.d.ndf=WIDTH`` on the 10,000 MNIST test images
on disk (``data.split=test data.download=false``: ``data.limit`` keeps the first LIMIT of them, class-balanced) into
``--out/limitLIMIT/AUG/seedSEED``; ``--jobs`` runs train side by side, each with ``--threads`` CPU threads. A run
directory that already holds a finished run of the same config is scored without training (and its scores are
read back from its ``scores.json``), so an interrupted benchmark is continued by running it again.

Every final generator draws ``--num`` samples from fixed noise, scored as ``scripts/recipe_fid.py`` scores: FID, KID
and precision/recall in the MNIST classifier's features against **all 10,000** test images, not only the LIMIT the
run trained on. ``--write`` replaces the ``--tag`` section of a markdown file with the table (every run, then each
row's mean over seeds and the ratio of the best augmentation's mean FID to no augmentation's), the p curves of the
``ada`` runs (an SVG drawn from their TensorBoard ``augment/p``) and a sample grid per row (copied to ``--img-dir``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import recipe_fid  # scripts/, as recipe_fid.py imports hand_loops
import torch
from recipe_fid import (
    REPO,
    add_scoring_arguments,
    checked_scorer,
    finished,
    last_grid,
    log_wall_and_speed,
    recipe_overrides,
    score_recipe,
)

from gantrain.files import atomic_write, replace_marked_section

AUGMENTS = ["none", "diffaugment", "ada"]
COLORS = {500: "#d62728", 2000: "#1f77b4"}  # p curves, by limit; other limits get a grey


@dataclass
class Run:
    """One scored run of the benchmark."""

    limit: int
    augment: str
    seed: int
    run_dir: Path
    scores: dict[str, float]
    steps: int
    wall_s: float
    final_p: float | None


def overrides(limit: int, augment: str, seed: int, args: argparse.Namespace) -> list[str]:
    width = [f"model.g.ngf={args.width}", f"model.d.ndf={args.width}"]
    extra = [f"data.limit={limit}", f"augment={augment}", *width, *args.overrides]
    return recipe_overrides("dcgan", seed, args.steps, args.data.resolve(), extra)


def plan(limit: int, augment: str, seed: int, args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    """One run's directory and the command that trains it (None: it holds a finished run of the same config, to be
    scored as it is). Another or an unfinished run's folder is refused. Not thread-safe (composes with Hydra)."""
    run_dir = (args.out / f"limit{limit}" / augment / f"seed{seed}").resolve()
    ovr = overrides(limit, augment, seed, args)
    if finished(run_dir, ovr):
        print(f"{run_dir}: finished run of the same config; scoring it", file=sys.stderr)
        return run_dir, None
    if run_dir.exists():  # never train over (or beside) another run: its files stay as they are
        raise SystemExit(
            f"limited_data.py: error: {run_dir} holds another or an unfinished run; give another --out or remove it"
        )
    return run_dir, [sys.executable, "-m", "gantrain", *ovr, f"hydra.run.dir={run_dir}"]


def final_p(run_dir: Path) -> float | None:
    """ADA's p in the run's last checkpoint (None without ADA)."""
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    part = saved.get("augment")
    return float(part["p"]) if isinstance(part, dict) and "p" in part else None


def p_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, p) of every ``augment/p`` the run logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in acc.Scalars("augment/p")] if "augment/p" in acc.Tags()["scalars"] else []


def svg_p_curves(curves: list[tuple[str, str, list[tuple[int, float]]]], steps: int) -> str:
    """A line chart (SVG text) of ADA's p against the training step: one (label, color, points) per curve."""
    w, h, left, right, top, bottom = 640, 360, 56, 150, 20, 44
    top_p = max([0.05] + [p for _, _, pts in curves for _, p in pts])
    top_p = max(0.1, round(top_p * 1.15 + 0.049, 1))  # the y axis: 0 .. a round number above the highest p

    def xy(step: float, p: float) -> tuple[float, float]:
        return left + (w - left - right) * step / steps, h - bottom - (h - top - bottom) * p / top_p

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
    ]
    for i in range(6):  # grid lines and tick labels
        p, step = top_p * i / 5, steps * i / 5
        x0, y = xy(0, p)
        x1, _ = xy(steps, p)
        out.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">{p:.2f}</text>')
        x, y0 = xy(step, 0)
        out.append(f'<text x="{x:.1f}" y="{y0 + 16:.1f}" text-anchor="middle">{step:,.0f}</text>')
    x0, y0 = xy(0, 0)
    x1, y1 = xy(steps, top_p)
    out += [
        f'<polyline points="{x0},{y1} {x0},{y0} {x1},{y0}" fill="none" stroke="black"/>',
        f'<text x="{(x0 + x1) / 2:.1f}" y="{h - 8}" text-anchor="middle">training step (64 images each)</text>',
        f'<text x="14" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" transform="rotate(-90 14 {(y0 + y1) / 2:.1f})">'
        "ADA p</text>",
    ]
    for i, (label, color, pts) in enumerate(curves):
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, p) for s, p in pts))
        out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5" opacity="0.85"/>')
        ly = top + 14 + 18 * i
        out.append(f'<line x1="{w - right + 12}" y1="{ly - 4}" x2="{w - right + 32}" y2="{ly - 4}" stroke="{color}" '
                   'stroke-width="2"/>')  # fmt: skip
        out.append(f'<text x="{w - right + 38}" y="{ly}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def mean_row(runs: list[Run]) -> list[float]:
    return [statistics.fmean(r.scores[k] for r in runs) for k in ("fid", "kid", "precision", "recall")]


def report(runs: list[Run], args: argparse.Namespace, argv: list[str], img_dir: Path | None) -> str:
    extra = f" plus `{' '.join(args.overrides)}`" if args.overrides else ""
    lines = [
        f"Measured {datetime.now():%Y-%m-%d} on {platform.machine()}, {os.cpu_count()} logical CPUs, CPU, Python "
        f"{platform.python_version()}, torch {torch.__version__}; {args.jobs} trainings side by side with "
        f"{args.threads} thread(s) each, so a run's wall time (its log's sessions, first to last line each) is that "
        "of a shared machine. Command:",
        "",
        "```bash",
        shlex.join(["python", "scripts/limited_data.py", *argv]),
        "```",
        "",
        f"`+experiment=dcgan` at width {args.width} (`model.g.ngf=model.d.ndf={args.width}`; 64 as shipped){extra}, "
        f"{args.steps:,} steps of 64 images, on `data=mnist data.split=test "
        "data.limit=LIMIT` (the first LIMIT of the 10,000 MNIST test images, class-balanced); `augment=` as "
        f"shipped. Scores of {args.num:,} samples of the final generator against **all 10,000** test images in "
        f"the features of the MNIST classifier `{args.weights}`. p: ADA's probability at the end.",
        "",
        "| limit | augment | seed | FID | KID | precision | recall | p at the end | wall min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        p = "—" if r.final_p is None else f"{r.final_p:.3f}"
        s = r.scores
        lines.append(
            f"| {r.limit:,} | `{r.augment}` | {r.seed} | {s['fid']:.2f} | {s['kid']:.4g} | "
            f"{s['precision']:.3f} | {s['recall']:.3f} | {p} | {r.wall_s / 60:.1f} |"
        )
    lines += [
        "",
        "Means over the seeds; the last column divides each row's mean FID by the same limit's `none` mean:",
        "",
        "| limit | augment | seeds | FID | KID | precision | recall | FID / none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for limit in dict.fromkeys(r.limit for r in runs):
        base = [r for r in runs if r.limit == limit and r.augment == "none"]
        base_fid = mean_row(base)[0] if base else None
        means = {}
        for aug in dict.fromkeys(r.augment for r in runs if r.limit == limit):
            rs = [r for r in runs if r.limit == limit and r.augment == aug]
            fid, kid, prec, rec = mean_row(rs)
            means[aug] = fid
            ratio = f"{fid / base_fid:.3f}" if base_fid else "—"
            lines.append(
                f"| {limit:,} | `{aug}` | {len(rs)} | {fid:.2f} | {kid:.4g} | {prec:.3f} | {rec:.3f} | {ratio} |"
            )
        augmented = {a: f for a, f in means.items() if a != "none"}
        if base_fid and augmented:
            best = min(augmented, key=augmented.get)
            verdicts.append(
                f"At `data.limit={limit}` the better augmentation, `{best}`, reaches {augmented[best] / base_fid:.3f}× "
                f"no augmentation's mean FID ({augmented[best]:.2f} against {base_fid:.2f})."
            )
    lines += ["", *verdicts, ""]
    if img_dir is not None:
        img_dir.mkdir(parents=True, exist_ok=True)
        curves = []
        for r in runs:
            pts = p_curve(r.run_dir) if r.augment == "ada" else []
            if pts:
                curves.append((f"limit {r.limit:,}, seed {r.seed}", COLORS.get(r.limit, "#777"), pts))
        if curves:
            svg = img_dir / f"{args.tag}_ada_p.svg"  # named after the section: two tables keep their pictures
            atomic_write(svg, lambda f: f.write(svg_p_curves(curves, args.steps).encode()), fsync=False)
            lines += [
                "ADA's p through each `ada` run (TensorBoard `augment/p`; it moves towards r_t = 0.6 at the "
                "shipped speed, 0 to 1 in 500k images):",
                "",
                f"![ADA p]({os.path.relpath(svg, args.write.parent if args.write else REPO)})",
                "",
            ]
        cells, heads = [], []
        for limit in dict.fromkeys(r.limit for r in runs):
            for aug in dict.fromkeys(r.augment for r in runs if r.limit == limit):
                first = next(r for r in runs if r.limit == limit and r.augment == aug)
                grid = last_grid(first.run_dir, first.steps)
                if grid is None:
                    continue
                name = f"{args.tag}_{limit}_{aug}_seed{first.seed}.png"
                shutil.copyfile(grid, img_dir / name)
                rel = os.path.relpath(img_dir / name, args.write.parent if args.write else REPO)
                heads.append(f"{limit:,}, `{aug}`, seed {first.seed}")
                cells.append(f"![{limit} {aug}]({rel})")
        if cells:
            lines += ["Samples at the last step:", "", "| " + " | ".join(heads) + " |",
                      "|" + "---|" * len(heads), "| " + " | ".join(cells) + " |", ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="limited_data.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--limits", type=int, nargs="+", default=[500, 2000], help="data.limit values (%(default)s)")
    ap.add_argument("--augments", nargs="+", default=AUGMENTS, choices=AUGMENTS, metavar="AUG")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # the benchmark's length: a DCGAN of width 16 with ADA costs 0.043 s a step on one thread of the machine in
    # docs/benchmarks.md, so 18,000 steps take 13 of the 15 CPU minutes a run may; width 64 affords 3,000
    ap.add_argument("--steps", type=int, default=18000, help="trainer.max_steps of every run (%(default)s)")
    ap.add_argument("--width", type=int, default=16, help="model.g.ngf and model.d.ndf (%(default)s; 64 as shipped)")
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side (%(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per training (%(default)s)")
    add_scoring_arguments(ap, out="outputs/limited_data_w16", tag="limited_data_w16")
    args = ap.parse_args(argv)
    for name in ("steps", "jobs", "threads", "width"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if bad := [n for n in args.limits if n < 1]:
        ap.error(f"--limits {bad[0]}: must be >= 1 (images to train on)")
    scorer = checked_scorer(ap, args)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the trainings' (recipe_fid.run passes os.environ on)
    keys = [(n, a, s) for n in args.limits for s in args.seeds for a in args.augments]
    planned = [plan(*k, args) for k in keys]
    with ThreadPoolExecutor(args.jobs) as pool:  # the trainings side by side; a failure stops with its log's name
        list(pool.map(lambda p: recipe_fid.run(p[1], p[0] / "stdout.log"), [p for p in planned if p[1]]))
    run_dirs = [run_dir for run_dir, _ in planned]
    runs = []
    for (limit, aug, seed), run_dir in zip(keys, run_dirs):
        result, _, steps = score_recipe(run_dir, scorer)
        wall, _ = log_wall_and_speed(run_dir / "train.log")
        runs.append(Run(limit, aug, seed, run_dir, result, steps, wall, final_p(run_dir)))
        print(f"limit {limit} {aug} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()),
              file=sys.stderr)  # fmt: skip
    runs.sort(key=lambda r: (args.limits.index(r.limit), args.augments.index(r.augment), r.seed))
    text = report(runs, args, argv, args.img_dir if args.write else None)
    print(text)
    if args.write:
        replace_marked_section(args.write, args.tag, text)


if __name__ == "__main__":
    main()
