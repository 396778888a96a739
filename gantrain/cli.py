"""The command line's front door: ``python -m gantrain`` (and the ``gantrain`` script).

``--help``/``-h`` prints gantrain's own help, read from the config files themselves (the recipes' one-line summaries
are each recipe's first comment line, the groups are the folders of ``configs/``), without importing torch or Hydra,
so it is quick. Everything else goes to :func:`gantrain.train.main`; Hydra's own help stays ``--hydra-help``.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

CONFIG_MODULE = "gantrain.configs"  # gantrain.config's; not imported from there, which imports torch
HELP_FLAGS = ("--help", "-h")
HIDDEN_GROUPS = ("experiment", "hydra/job_logging")  # recipes are listed apart; job_logging is gantrain's internals
# The keys a first run changes most; every key and its value: --cfg job. No defaults here: they live in the code.
MAIN_KEYS = {
    "trainer.max_steps": "training steps (a GAN's step: n_critic updates of D, one of G)",
    "trainer.device": "auto, cpu, cuda, cuda:1, mps",
    "data.batch_size": "images per step",
    "trainer.resume": "auto (continue the run in hydra.run.dir), a checkpoint path, or null",
    "trainer.eval_every_n_steps": "evaluation (metrics=fid, toy/*, a VAE's ELBO) every N steps and at the end",
    "trainer.monitor": "the evaluated value best.ckpt and sweepers go by",
    "trainer.precision": "32, bf16-mixed, 16-mixed",
    "trainer.compile": "torch.compile the networks",
    "seed": "the run's seed",
    "hydra.run.dir": "the run directory (default outputs/<experiment>/<time>_<id>...)",
}


def config_dir() -> Path:
    return Path(str(importlib.resources.files(CONFIG_MODULE)))


def summary(path: Path) -> str:
    """A recipe's one line: its first comment line other than Hydra's ``# @package`` header."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    return ""


def groups(configs: Path) -> dict[str, list[str]]:
    """Every config group (a folder of ``configs/`` holding YAML options, nested ones as ``metrics/extractor``)."""
    found: dict[str, list[str]] = {}
    for folder in sorted(p for p in configs.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        name = folder.relative_to(configs).as_posix()
        if options and name not in HIDDEN_GROUPS:
            found[name] = options
    return found


def defaults(configs: Path) -> dict[str, str | None]:
    """``group: option`` of the primary config's defaults list (and a group option's own, e.g.
    ``metrics/extractor`` from ``metrics/fid.yaml``), read as text: PyYAML would be the slowest import here."""
    chosen: dict[str, str | None] = {}
    files = [(configs / "train.yaml", "")] + [(p, p.parent.name + "/") for p in configs.glob("*/*.yaml")]
    for path, prefix in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = line.split("#")[0].strip()
            if entry.startswith("- ") and ":" in entry and not entry.startswith(("- override", "- /")):
                group, option = (s.strip() for s in entry[2:].split(":", 1))
                chosen.setdefault(prefix + group, None if option == "null" else option)
    return chosen


def readme() -> str:
    here = Path(__file__).resolve().parent.parent / "README.md"
    return str(here) if here.is_file() else "README.md in the gantrain repository"


def help_text() -> str:
    configs = config_dir()
    recipes = sorted(configs.glob("experiment/*.yaml"))
    width = max(len(p.stem) for p in recipes) + 2
    out = [
        "usage: python -m gantrain [+experiment=RECIPE] [GROUP=OPTION ...] [KEY=VALUE ...]",
        "       python -m gantrain -m KEY=A,B ...    a sweep: one run per combination",
        "",
        "Trains a GAN or a VAE from a recipe; each run writes its own directory under outputs/.",
        "",
        f"recipes (+experiment=RECIPE; {configs / 'experiment'}):",
        *(f"  {p.stem:<{width}}{summary(p)}" for p in recipes),
        "",
        "config groups (GROUP=OPTION; * marks the default):",
    ]
    chosen, found = defaults(configs), groups(configs)
    width = max(len(g) for g in found) + 2
    for group, options in found.items():
        shown = ", ".join(o + ("*" if chosen.get(group) == o else "") for o in options)
        out.append(f"  {group:<{width}}{shown}")
    width = max(len(k) for k in MAIN_KEYS) + 2
    out += ["", "main keys (KEY=VALUE):", *(f"  {k:<{width}}{v}" for k, v in MAIN_KEYS.items())]
    out += [
        "",
        "Every key and its value: python -m gantrain [+experiment=RECIPE] --cfg job",
        "Hydra's own help: python -m gantrain --hydra-help",
        f"Documentation: {readme()}",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    """``python -m gantrain``: the help here, anything else to :func:`gantrain.train.main`."""
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        sys.stdout.write(help_text())
        return
    from gantrain.train import main as train_main

    train_main()
