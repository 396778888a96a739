"""Train image recipes on the MNIST test set and score their generators by "classifier FID", KID and precision/recall.

    python scripts/mnist_classifier.py                                   # once: the feature extractor's weights
    python scripts/recipe_fid.py --write docs/benchmarks.md              # every image recipe, default lengths, seed 0
    python scripts/recipe_fid.py --recipes dcgan --seeds 0 1 2 --hand --write docs/benchmarks.md --tag dcgan_vs_hand
    python scripts/recipe_fid.py --recipes lsgan --steps 50 --num 500    # a quick check of the pipeline

Each (recipe, seed) trains through ``python -m gantrain +experiment=RECIPE`` on ``data=mnist`` pointed at the
10,000 MNIST test images on disk (``data.split=test data.download=false``; ``--steps`` overrides the recipe's
length, extra ``KEY=VALUE`` overrides after ``--`` apply to every run) into ``--out/RECIPE/seedS``. A run
directory that already holds a finished run of the same config is scored again without training, and scores
already computed for the same checkpoint, classifier and ``--num`` are read back from its ``scores.json``.
``--hand`` adds the plain DCGAN loop of ``scripts/hand_loops.py`` (same networks, data, batch and steps).

Each final generator (the EMA weights when the run kept an EMA; the raw ones are scored too) draws ``--num``
samples from fixed noise; their features in the MNIST classifier (``gantrain.extractors.mnist``) are compared
with those of the 10,000 real images at the model's resolution by ``gantrain.metrics.scores`` (torch-fidelity).
These FIDs are comparable only with each other: another extractor, sample count or reference set gives
other numbers. ``--write`` replaces the ``--tag`` section of a markdown file with the table and each recipe's
last sample grid (copied to ``--img-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from hand_loops import dcgan_generator, mnist_t10k  # scripts/, as bench.py imports it

from gantrain.errors import GantrainError
from gantrain.extractors.mnist import DEFAULT_WEIGHTS, MnistFeatures
from gantrain.files import atomic_write, replace_marked_section
from gantrain.metrics import features, scores
from gantrain.metrics.scores import intra_fid
from gantrain.metrics.suite import fingerprint
from gantrain.models import GenerativeModel
from gantrain.sampling import generate, load_model

REPO = Path(__file__).resolve().parents[1]
IMAGE_RECIPES = [
    "dcgan", "wgan_gp", "wgan", "hinge_sngan", "lsgan", "r3gan", "vae", "vaegan", "vae_mlp", "vae_mnist",
    "cgan_pd", "acgan", "cvae",
]  # fmt: skip
HAND = "hand-written DCGAN loop"
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


@dataclass
class Result:
    """One scored run: its scores, the raw generator's FID when the scores are of an EMA, wall time, images/s."""

    recipe: str
    seed: int
    steps: int
    scores: dict[str, float]
    raw_fid: float | None
    wall_s: float
    images_per_s: float | None
    grid: Path | None
    command: list[str] = field(default_factory=list)


def recipe_overrides(recipe: str, seed: int, steps: int | None, data_root: Path, extra: list[str]) -> list[str]:
    """The command-line overrides of one benchmark run (without its run directory)."""
    return [
        f"+experiment={recipe}",
        "data=mnist",
        f"data.root={data_root}",
        "data.split=test",
        "data.download=false",
        f"seed={seed}",
        "trainer.progress_bar=false",
        *([f"trainer.max_steps={steps}"] if steps is not None else []),
        *extra,
    ]


def finished(run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``run_dir`` holds a completed run of the config these overrides compose to (then it is scored,
    not retrained); the overrides may have been spelled differently, e.g. before a recipe took one of them."""
    from omegaconf import OmegaConf

    from gantrain.train import compose_config

    saved, log = run_dir / "config.yaml", run_dir / "train.log"
    if not (saved.is_file() and log.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()):
        return False
    wanted = OmegaConf.to_container(compose_config(*overrides), resolve=True)
    done = log_says_finished(log.read_text())
    saved_cfg = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    for cfg in (saved_cfg, wanted):  # a run continued with trainer.resume=auto is the same run
        cfg.get("trainer", {}).pop("resume", None)
    return done and _same_config(saved_cfg, wanted)


def log_says_finished(text: str) -> bool:
    """Whether a train.log's last session reached its last step (``step N/N``) and was not stopped: a run stopped
    by a signal and then continued to the end with ``trainer.resume=auto`` is finished."""
    last_stop = text.rfind("stopped by")
    return any(m.start() > last_stop for m in re.finditer(r"step (\d+)/\1\b", text))


def _same_config(saved: object, wanted: object) -> bool:
    """``saved == wanted``, except that keys only ``wanted`` has (added to gantrain after the run) are ignored."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return saved.keys() <= wanted.keys() and all(_same_config(v, wanted[k]) for k, v in saved.items())
    return saved == wanted


def log_wall_and_speed(log: Path) -> tuple[float, float | None]:
    """(seconds a run's train.log spans, the last images/s it printed). A resumed run's log holds one session after
    another, each opening with its ``loading the data`` line or, in older logs, its ``run directory:`` line: the
    time between sessions is not counted."""
    wall, first, last, opened = 0.0, None, None, False
    lines = log.read_text().splitlines()
    for line in lines:
        m = _LOG_TIME.match(line)
        if not m:
            continue
        stamp = datetime.fromisoformat(m.group(1))
        starts = " - loading the data" in line or (" - run directory: " in line and not opened)
        if starts and first is not None:  # a new session: close the last one
            wall, first = wall + (last - first).total_seconds(), None
        first, last, opened = first or stamp, stamp, " - loading the data" in line
    speeds = re.findall(r"([0-9.]+) img/s", "\n".join(lines))
    return wall + (last - first).total_seconds(), float(speeds[-1]) if speeds else None


def run(command: list[str], log: Path) -> None:
    """Run ``command`` with its output in ``log``; a failure stops the benchmark naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    with open(log, "w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
    if code:
        raise SystemExit(f"recipe_fid.py: {shlex.join(command)} failed (exit {code}); see {log}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def train_recipe(recipe: str, seed: int, steps: int | None, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Train (or find finished) one recipe run; returns its run directory and the command."""
    run_dir = (args.out / recipe / f"seed{seed}").resolve()
    overrides = recipe_overrides(recipe, seed, steps, args.data.resolve(), args.overrides)
    command = [sys.executable, "-m", "gantrain", *overrides, f"hydra.run.dir={run_dir}"]
    if finished(run_dir, overrides):
        print(f"{run_dir}: finished run of the same config; scoring it", file=sys.stderr)
    elif run_dir.exists():  # never train over (or beside) another run: its files stay as they are
        raise SystemExit(
            f"recipe_fid.py: error: {run_dir} holds another or an unfinished run; give another --out or remove it"
        )
    else:
        run(command, run_dir / "stdout.log")
    return run_dir, command


def train_hand(seed: int, steps: int, args: argparse.Namespace) -> tuple[Path, list[str], float]:
    """Train (or find finished) the hand-written DCGAN loop; returns its folder, command and wall seconds."""
    run_dir = (
        args.out / ("hand_dcgan" if args.hand_lr is None else f"hand_dcgan_lr{args.hand_lr:g}") / f"seed{seed}"
    ).resolve()
    # what decides the result (not python's path, the script's or the output's: a moved repository or output
    # folder is still recognised)
    hand = ["dcgan", "--steps", str(steps), "--data", str(args.data.resolve()), "--seed", str(seed)]
    hand += [] if args.hand_lr is None else ["--lr", f"{args.hand_lr:g}"]
    command = [sys.executable, str(REPO / "scripts" / "hand_loops.py"), *hand, "--save", str(run_dir / "g.pt")]
    done, same = run_dir / "wall_s.txt", shlex.join(hand)
    recorded = run_dir / "command.txt"
    if done.is_file() and (run_dir / "g.pt").is_file() and recorded.is_file() and recorded.read_text() == same:
        print(f"{run_dir}: finished hand loop of the same arguments; scoring it", file=sys.stderr)
    elif run_dir.exists():  # as for the recipes: another run's files stay as they are
        raise SystemExit(
            f"recipe_fid.py: error: {run_dir} holds another or an unfinished run; give another --out or remove it"
        )
    else:
        t0 = time.perf_counter()
        run(command, run_dir / "stdout.log")
        done.write_text(f"{time.perf_counter() - t0:.1f}")
        recorded.write_text(same)
    return run_dir, command, float(done.read_text())


def hand_generator(path: Path) -> GenerativeModel:
    """The hand loop's saved G in gantrain's model wrapper, so it samples exactly as the recipes do."""
    model = GenerativeModel(dcgan_generator(), None, resolution=32, channels=1)
    model.g.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


class Scorer:
    """Features of the real images (once per resolution) and scores of a generator against them."""

    def __init__(self, args: argparse.Namespace):
        self.extractor = MnistFeatures(str(args.weights))
        self.data, self.num, self.real = args.data.resolve(), args.num, {}
        self.fingerprint = fingerprint(self.extractor)

    def real_features(self, resolution: int) -> torch.Tensor:
        if resolution not in self.real:
            self.real[resolution] = features(self.extractor, mnist_t10k(self.data, resolution))
        return self.real[resolution]

    def __call__(self, model: GenerativeModel) -> dict[str, float]:
        """FID, KID, precision/recall; for a conditional model also the class accuracy (%: samples the classifier
        labels as the class they were generated for) and intra-FID, on balanced labels (sample i: class i % 10)."""
        fake = generate(model, self.num, seed=0, device="cpu", progress=False)
        real, fake_features = self.real_features(fake.shape[-1]), features(self.extractor, fake)
        out = scores(real, fake_features)
        if model.conditional:
            labels = torch.arange(self.num) % model.num_classes
            with torch.no_grad():
                predicted = torch.cat([self.extractor.classify(x).argmax(1) for x in fake.split(500)])
            out["class_accuracy"] = 100.0 * (predicted == labels).double().mean().item()
            out["intra_fid"] = intra_fid(real, mnist_t10k_labels(self.data), fake_features, labels)
        return out

    def file(self, weights: Path, which: str, load: Callable[[], torch.nn.Module]) -> dict[str, float]:
        """Scores of the generator ``load()`` builds from ``weights``, kept in the run directory's ``scores.json``,
        keyed by ``which``, the file's size and time, the extractor's fingerprint and the sample count."""
        cache = (weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent) / "scores.json"
        st = weights.stat()
        key = f"{weights.name}:{which}:{st.st_size}:{st.st_mtime_ns}:{self.fingerprint}:{self.num}"
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in saved:
            saved[key] = self(load())
            atomic_write(cache, lambda f: f.write(json.dumps(saved, indent=1).encode()), fsync=False)
        return saved[key]


def mnist_t10k_labels(root: Path) -> torch.Tensor:
    """The classes of :func:`mnist_t10k`'s images, in the same order."""
    from gantrain.data.mnist import TorchvisionImages

    data = TorchvisionImages(name="mnist", root=str(root), split="test", download=False, channels=1, resolution=32)
    return data.training_labels()


def score_recipe(run_dir: Path, scorer: Scorer) -> tuple[dict[str, float], float | None, int]:
    """(scores of the final generator, EMA weights if kept; the raw generator's FID if there was an EMA; steps)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    result = scorer.file(ckpt, "ema", lambda: load_model(ckpt, ema=True))
    raw = scorer.file(ckpt, "raw", lambda: load_model(ckpt, ema=False))["fid"] if saved.get("ema") else None
    return result, raw, int(saved["config"]["trainer"]["max_steps"])


def last_grid(run_dir: Path, steps: int) -> Path | None:
    grid = run_dir / "samples" / f"step_{steps:07d}.png"
    return grid if grid.is_file() else None


def mean_and_seeds(values: list[float], fmt: str) -> str:
    text = format(statistics.fmean(values), fmt)
    return text if len(values) == 1 else f"{text} ({', '.join(format(v, fmt) for v in values)})"


def table(results: list[Result]) -> list[str]:
    """One row per recipe: means over seeds (per-seed values in brackets)."""
    rows = [
        "| recipe | steps | seeds | FID (seeds) | FID, raw G | KID | precision | recall | wall min | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in dict.fromkeys(r.recipe for r in results):
        rs = [r for r in results if r.recipe == recipe]
        raw = [r.raw_fid for r in rs if r.raw_fid is not None]
        speeds = [r.images_per_s for r in rs if r.images_per_s is not None]
        name = recipe if recipe.startswith(HAND) else f"`{recipe}`"
        rows.append(
            f"| {name} | {rs[0].steps} | {', '.join(str(r.seed) for r in rs)} | "
            f"{mean_and_seeds([r.scores['fid'] for r in rs], '.2f')} | "
            f"{mean_and_seeds(raw, '.2f') if len(raw) == len(rs) else '—'} | "
            f"{statistics.fmean(r.scores['kid'] for r in rs):.4g} | "
            f"{statistics.fmean(r.scores['precision'] for r in rs):.3f} | "
            f"{statistics.fmean(r.scores['recall'] for r in rs):.3f} | "
            f"{statistics.fmean(r.wall_s for r in rs) / 60:.1f} | "
            f"{format(statistics.fmean(speeds), '.0f') if speeds else '—'} |"
        )
    return rows


def conditional_table(results: list[Result]) -> list[str]:
    """One row per conditional run (every seed), then each recipe's mean: class accuracy, intra-FID and the rest."""
    rows = [
        "| recipe | seed | steps | class accuracy % | intra-FID | FID | KID | precision | recall | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ("class_accuracy", "intra_fid", "fid", "kid", "precision", "recall")
    formats = (".2f", ".2f", ".2f", ".4g", ".3f", ".3f")

    def row(name: str, seed: str, steps: int, values: list[float], wall: float) -> str:
        cells = " | ".join(format(v, f) for v, f in zip(values, formats))
        return f"| {name} | {seed} | {steps} | {cells} | {wall / 60:.1f} |"

    for recipe in dict.fromkeys(r.recipe for r in results if "class_accuracy" in r.scores):
        rs = [r for r in results if r.recipe == recipe]
        for r in rs:
            rows.append(row(f"`{recipe}`", str(r.seed), r.steps, [r.scores[k] for k in keys], r.wall_s))
        if len(rs) > 1:
            means = [statistics.fmean(r.scores[k] for r in rs) for k in keys]
            rows.append(row(f"`{recipe}` mean", "—", rs[0].steps, means, statistics.fmean(r.wall_s for r in rs)))
    return rows


def report(results: list[Result], args: argparse.Namespace, argv: list[str], img_dir: Path | None) -> str:
    extra = f" plus `{' '.join(args.overrides)}`" if args.overrides else ""
    lines = [
        f"Measured {datetime.now():%Y-%m-%d} on {platform.machine()}, {os.cpu_count()} logical CPUs shared with other "
        f"jobs, CPU, Python {platform.python_version()}, torch {torch.__version__}; each run's wall time is from "
        f"its log's first to last line. Command:",
        "",
        "```bash",
        shlex.join(["python", "scripts/recipe_fid.py", *argv]),
        "```",
        "",
        f"Every recipe as shipped{extra}, on `data=mnist data.root=<mnist-t10k> data.split=test` (the 10,000 MNIST "
        f"test images); scores of {args.num:,} samples of the final generator (its EMA where the recipe keeps "
        "one; \"FID, raw G\": the same run's raw weights) against the 10,000 real images at the model's "
        f"resolution, in the features of the MNIST classifier `{args.weights}`.",
        "",
        *table(results),
        "",
    ]
    if any("class_accuracy" in r.scores for r in results):
        lines += [
            "Conditional recipes, per seed: the class accuracy is the share of samples (1,000 per class, classes "
            "balanced) the MNIST classifier labels as the class they were generated for; intra-FID the FID of each "
            "class's samples against that class's ~1,000 real images, averaged over the 10 classes.",
            "",
            *conditional_table(results),
            "",
        ]
    for recipe in dict.fromkeys(r.recipe for r in results):
        first = next(r for r in results if r.recipe == recipe)
        if first.grid and img_dir:
            name = f"{recipe}_mnist_seed{first.seed}_step{first.steps}.png"
            img_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first.grid, img_dir / name)
            lines += [f"`{recipe}`, seed {first.seed}, step {first.steps}:", "", f"![{recipe}](img/{name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def add_scoring_arguments(ap: argparse.ArgumentParser, out: str, tag: str) -> None:
    """The options this script and ``limited_data.py`` share: samples, data, classifier, run folders, the markdown."""
    ap.add_argument("--num", type=int, default=10_000, help="generated samples per score (%(default)s)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist-t10k", metavar="DIR")
    ap.add_argument("--weights", type=Path, default=Path(DEFAULT_WEIGHTS), help="the classifier (%(default)s)")
    ap.add_argument("--out", type=Path, default=Path(out), help="run folders (%(default)s)")
    ap.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--write", type=Path, metavar="MD", help="replace the --tag section of this markdown file")
    ap.add_argument("--tag", default=tag, help="the section's marker name (%(default)s)")
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE overrides for every run (after --)")


def checked_scorer(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Scorer:
    """The :class:`Scorer` of ``--num``, ``--data`` and ``--weights``, each checked before any training (one line)."""
    from gantrain.data.mnist import idx_files

    if args.num < 2:
        ap.error(f"--num {args.num}: must be >= 2")
    if idx_files(args.data, "MNIST", "t10k") is None:
        ap.error(f"--data {args.data}: no t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in raw/")
    try:
        return Scorer(args)  # a missing or foreign classifier file is one line
    except GantrainError as e:
        ap.error(str(e).replace("weights_path=", "--weights ", 1))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="recipe_fid.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=IMAGE_RECIPES, choices=IMAGE_RECIPES, metavar="NAME")
    ap.add_argument("--steps", type=int, help="trainer.max_steps for every run (default: each recipe's own)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--hand", action="store_true", help="add the hand-written DCGAN loop (scripts/hand_loops.py)")
    ap.add_argument("--hand-lr", type=float, metavar="LR", help="the hand loop's Adam lr (default: its own, 2e-4)")
    add_scoring_arguments(ap, out="outputs/recipe_fid", tag="recipe_fid.py")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    if args.hand_lr is not None and (not args.hand or args.hand_lr <= 0):
        ap.error(f"--hand-lr {args.hand_lr}: needs --hand, and > 0")
    if args.hand and args.steps is None and "dcgan" not in args.recipes:
        ap.error("--hand: give --steps, or include dcgan in --recipes (the hand loop takes its length)")
    scorer = checked_scorer(ap, args)
    results: list[Result] = []
    for recipe in args.recipes:
        for seed in args.seeds:
            run_dir, command = train_recipe(recipe, seed, args.steps, args)
            result, raw, steps = score_recipe(run_dir, scorer)
            wall, speed = log_wall_and_speed(run_dir / "train.log")
            results.append(Result(recipe, seed, steps, result, raw, wall, speed, last_grid(run_dir, steps), command))
            print(f"{recipe} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), file=sys.stderr)
    if args.hand:
        steps = args.steps or next(r.steps for r in results if r.recipe == "dcgan")
        for seed in args.seeds:
            run_dir, command, wall = train_hand(seed, steps, args)
            g = run_dir / "g.pt"
            result = scorer.file(g, "g", lambda g=g: hand_generator(g))
            name = HAND if args.hand_lr is None else f"{HAND}, lr {args.hand_lr:g}"
            results.append(Result(name, seed, steps, result, None, wall, None, None, command))
            print(f"hand loop seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), file=sys.stderr)
    text = report(results, args, argv, args.img_dir if args.write else None)
    print(text)
    if args.write:
        replace_marked_section(args.write, args.tag, text)


if __name__ == "__main__":
    main()
