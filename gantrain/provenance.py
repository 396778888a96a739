"""Where a run came from, as its logs record it: the hparams row, the command line and the code's git commit."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def hparams_row(cfg: DictConfig) -> dict[str, Any]:
    """The hparams table's row: the recipe, the seed and the keys overridden on the command line (of a multirun,
    the swept ones: an override every job shares is no column), with their values as they ran."""
    row: dict[str, Any] = {"experiment": cfg.experiment_name, "seed": cfg.seed}
    # what a float32 matmul/convolution computes with (speed.apply set both for this run): a column in every run
    row["trainer.matmul_precision"] = cfg.trainer.matmul_precision  # its default lives in TrainerSettings alone
    row["cudnn.benchmark"] = bool(torch.backends.cudnn.benchmark)
    if not HydraConfig.initialized():
        return row
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    shared: set[str] = set()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the command line's one-value overrides are the same in every job
        try:
            parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a])
            shared = {o.key_or_group for o in parsed if not o.is_sweep_override()}
        except Exception:  # noqa: BLE001 - the command line Hydra already parsed; keep every override then
            shared = set()
    for override in hydra_cfg.overrides.task:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra.") or key == "trainer.resume" or key in shared:
            continue
        selected = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        row[key] = selected if isinstance(selected, (int, float, str, bool)) else value
    return row


def command_line() -> str:
    """The command that started this run (under Hydra), else a note; of a sweep's job, the command that runs this job
    alone (its own overrides, not the whole ``-m`` line)."""
    if not HydraConfig.initialized():
        return "(started from Python, not the command line)"
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return shlex.join(["python", "-m", "gantrain", *hydra_cfg.overrides.task])
    return shlex.join(["python", "-m", "gantrain", *sys.argv[1:]])


def code_version() -> str:
    """The git commit of the gantrain code that runs (noting uncommitted changes), or "not a git checkout"."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=10)
        lines = top.stdout.split()
        if top.returncode or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return "not a git checkout"
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return lines[1] + (" with uncommitted changes" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
