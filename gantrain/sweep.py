"""A ``-m`` sweep's own parts: its jobs' directory names show what they sweep, and its end ranks the jobs.

Each job writes ``result.json`` into its directory (the value of ``trainer.monitor`` it returns to the sweeper and the
step of that value); when the sweep ends, :class:`SweepReport` logs one table of the sweep directory's jobs ranked by
it and writes the table to ``<sweep dir>/ranking.txt``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import OmegaConf

from gantrain.files import atomic_write
from gantrain.metrics.loop import direction

RESULT_FILE = "result.json"
RANKING_FILE = "ranking.txt"
log = logging.getLogger("gantrain")


def swept(overrides: list[str]) -> list[str]:
    """The keys of ``overrides`` (a ``-m`` command line's) that take more than one value (``optim.d.lr=1e-4,2e-4``,
    ``seed=range(3)``, an Optuna interval)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def swept_keys() -> str:
    """``${swept_keys:}`` (cached): the keys a ``-m`` command line sweeps, comma-separated. :class:`SweepReport` puts
    them into the sweep's config cache before the jobs start, and Hydra copies that cache into every job's config (as
    for ``${now:}``), in whatever process the job runs. Uncached (not a sweep): ""."""
    return ""


def record(cfg: Any, value: float, metrics: dict[str, float]) -> float:
    """Of a sweep's job (rank 0): write ``value`` (``trainer.monitor``'s, what it returns to the sweeper) into its
    directory's ``result.json``, with the step it is of (the best's, for an evaluated monitor; else the last step)
    and whether lower or higher is better. Returns ``value``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gantrain import distributed

    if HydraConfig.get().mode != RunMode.MULTIRUN or not distributed.current().is_main:
        return value
    monitor = cfg.trainer.monitor
    step = metrics.get(f"best/{monitor}/step", metrics.get("step", 0))
    result = {"monitor": monitor, "mode": direction(monitor, cfg.trainer.monitor_mode), "value": value}
    text = json.dumps({**result, "step": int(step)}) + "\n"
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    atomic_write(run_dir / RESULT_FILE, lambda f: f.write(text.encode()), fsync=False)
    return value


def ranking(sweep_dir: Path) -> tuple[str, list[dict[str, Any]]] | None:
    """The table of the jobs in ``sweep_dir`` that wrote a result, best first (a NaN last), and the rows; None if
    none did."""
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if (p / RESULT_FILE).is_file()):
        rows.append({**json.loads((job / RESULT_FILE).read_text()), "run_dir": str(job.resolve())})
    if not rows:
        return None
    monitor, mode = rows[0]["monitor"], rows[0]["mode"]
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (not math.isfinite(r["value"]), sign * r["value"] if math.isfinite(r["value"]) else 0))
    header = ("rank", monitor, "step", "run directory")
    cells = [header] + [(str(i), f"{r['value']:.6g}", str(r["step"]), r["run_dir"]) for i, r in enumerate(rows, 1)]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join([c[0].rjust(widths[0]), c[1].rjust(widths[1]), c[2].rjust(widths[2]), c[3]]) for c in cells]
    better = "lower" if mode == "min" else "higher"
    title = f"{len(rows)} jobs ranked by {monitor} ({better} is better)"
    return title + ":\n" + "\n".join(lines) + "\n", rows


class SweepReport(HydraCallback):
    """Hydra callback (``hydra.callbacks``). Before a sweep's jobs start: its swept keys into the config's cache for
    ``${swept_keys:}`` (the jobs' directory names). When it ends: the jobs ranked by ``trainer.monitor``, logged and
    written to ``<sweep dir>/ranking.txt``."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        keys = swept(OmegaConf.to_container(config.hydra.overrides.task))
        OmegaConf.get_cache(config)["swept_keys"][()] = ",".join(keys)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = ranking(sweep_dir) if sweep_dir.is_dir() else None
        if table is None:
            return
        text, _ = table
        atomic_write(sweep_dir / RANKING_FILE, lambda f: f.write(text.encode()), fsync=False)
        log.info("sweep %s: %s(also in %s)", sweep_dir.resolve(), text, RANKING_FILE)
