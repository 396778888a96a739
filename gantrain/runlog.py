"""Run logging in one callback, :class:`RunLog`: TensorBoard, tqdm, console lines, sample PNGs, evaluation results.

Every ``log_every_n_steps`` it drains the stats that losses ``report``-ed (plus images/s and the fp16 scales) into
TensorBoard scalars, the bar's postfix and :attr:`RunLog.stats`; after each evaluation
(:class:`gantrain.metrics.Evaluation`) it logs its results with one console line; every ``sample_every_n_steps`` it
draws sample grids, with the EMA weights swapped in, and a background thread encodes them (PNG files, TensorBoard
images) while training goes on; it does both once more at the end (unless that step's grid was just written). Only rank
0 writes anything.

The console shows a tqdm bar when it is a terminal and ``progress_bar`` is on; otherwise (a cluster log,
``> out.txt 2>&1``) a plain line at most every ``log_every_n_seconds``, which holds no carriage returns. ``train.log``
gets the plain lines either way (under the bar they are marked :data:`~gantrain.rundir.FILE_ONLY`: not for the
console). A line before the first step says what the run starts with; the first progress line comes after the first
step, or after ``log_every_n_seconds`` while the first step still runs, whichever is first. The last line of a finished
run names where everything is.

Every logged step and every evaluation is also one JSON object in ``metrics.jsonl`` (:data:`METRICS_FILE`), for scripts
that do not read TensorBoard: ``step``, ``images_seen``, ``wall_time`` (Unix seconds) and the scalars, non-finite ones
as null. A resumed run appends; the steps it re-runs after its checkpoint appear again, as they do in TensorBoard
(for such a step, the later line is the resumed run's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shlex
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm.auto import tqdm

from gantrain.checkpoint import Checkpointing
from gantrain.events import Callback
from gantrain.files import FULL, NOT_WRITABLE, atomic_write, write_error
from gantrain.readahead import DrawnAhead, ReadAhead
from gantrain.rundir import FILE_ONLY

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


# n/total, the bar, time left and the short postfix: fits an 80-column terminal (tests/test_logs.py).
BAR_FORMAT = "{n_fmt}/{total_fmt} |{bar}| ETA {remaining}{postfix}"


def console_is_terminal() -> bool:
    """Whether a bar can be drawn: the console log (stdout) and the bar (stderr) both go to a terminal."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def main_losses(stats: dict[str, float]) -> dict[str, float]:
    """The top-level loss terms (``loss/D``, ``loss/G``, ``loss/recon``, ...), not their parts (``loss/D/gp``)."""
    return {k: v for k, v in stats.items() if k.count("/") == 1 and k.startswith("loss/")}


class RunLog(Callback):
    """Logs a run into ``run_dir`` (TensorBoard events, ``samples/step_0000200.png``, ...).

    Args:
        sampler: returns the picture to log as ``samples`` (``(3, H, W)`` in [0, 1]), from fixed noise and
            changing no state; or a dict of named pictures (``samples``, ``reconstructions``, ...).
        config: the resolved config, logged as text.
        hparams: the hparams table's row (overridden keys, recipe, seed); its metrics are ``metric_tags``.
        about: more text to log (the command line, the code's git commit), title -> text.
        is_main: rank 0 logs; other ranks only keep the last logged values (:meth:`results`).
        checkpoints: the run's :class:`~gantrain.checkpoint.Checkpointing`, whose files the last line names.
        terminal: whether the console is a terminal (a bar, else plain lines); None: :func:`console_is_terminal`.
        clock: seconds, for images/s, ETA and the plain lines' rate limit.
    """

    def __init__(
        self,
        run_dir: str | Path,
        sampler=None,
        config: dict | None = None,
        hparams: dict | None = None,
        metric_tags: Sequence[str] = (),
        about: dict[str, str] | None = None,
        is_main=True,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
        checkpoints: Checkpointing | None = None,
    ):
        self.run_dir, self.sampler = Path(run_dir), sampler
        self.hparams, self.metric_tags, self.about = hparams or {}, list(metric_tags), about or {}
        self.config, self.is_main, self.terminal, self.clock = config or {}, is_main, terminal, clock
        self.checkpoints = checkpoints
        self.writer = self.bar = None  # opened by on_fit_start, closed by teardown
        self.grids: list[Path] = []  # the pictures write_samples wrote last
        self.stats: dict[str, float] = {}  # the last logged training stats
        self.evaluation: tuple[int, dict[str, float], dict | None] | None = None  # (step, values, best), last one
        self._evaluation_logged: int | None = None  # the step whose evaluation was logged last
        self._encoder: ThreadPoolExecutor | None = None  # writes sample grids off the training loop
        self._writing: Future | None = None  # the grids being written
        self._metrics_file = None  # metrics.jsonl, appended (rank 0)
        self._first_step_timer: threading.Timer | None = None  # the line while the first step is still running

    def on_fit_start(self, trainer) -> None:
        if self.is_main:
            self.open_writer(trainer.step)
            self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gantrain-samples")
        s = trainer.settings
        terminal = console_is_terminal() if self.terminal is None else self.terminal
        show_bar = self.is_main and s.progress_bar and terminal
        self.plain_lines = self.is_main  # under the bar they go to train.log only
        self._extra = FILE_ONLY if show_bar else None
        steps_left = trainer.step < s.max_steps  # else a resume found nothing to do (Checkpointing said so)
        if self.is_main:
            self._metrics_file = (self.run_dir / METRICS_FILE).open("a", encoding="utf-8")
            if steps_left:
                self.log_start(trainer)
        self.bar = tqdm(
            total=s.max_steps, initial=trainer.step, dynamic_ncols=True, bar_format=BAR_FORMAT, disable=not show_bar
        )
        self._t0, self._images0 = self.clock(), trainer.images_seen  # images/s since the last log
        self._start = (self._t0, trainer.step)  # ETA: this process's steps per second
        self._line = (None, trainer.step)  # time and step of the last plain line
        if self.is_main and steps_left and s.log_every_n_seconds > 0:
            self._first_step_timer = threading.Timer(s.log_every_n_seconds, self.log_first_step_running, (trainer,))
            self._first_step_timer.daemon = True
            self._first_step_timer.start()

    state_key = "metrics"  # the last logged values: what a finished run returns when resumed with nothing to do

    def results(self) -> dict[str, float]:
        return {**self.stats, **(self.evaluation[1] if self.evaluation else {})}

    def state_dict(self) -> dict[str, float]:
        # without wall-clock figures, so that the same seed writes byte-identical checkpoints
        return {k: v for k, v in self.results().items() if not k.startswith("perf/")}

    def load_state_dict(self, metrics: dict[str, float]) -> None:
        self.stats = dict(metrics)

    def on_evaluation(self, trainer, values: dict[str, float], best: dict | None) -> None:
        self.evaluation = (trainer.step, values, best)  # logged after this step's stats, in on_step_end/on_fit_end

    def on_step_end(self, trainer) -> None:
        self.bar.update(1)
        if trainer.step == self._start[1] + 1:
            self.log_first_step(trainer)
        if trainer.cadence.logs(trainer.step):
            self.log_stats(trainer)
            self.log_progress(trainer)
        if self.evaluation and self.evaluation[0] == trainer.step:
            self.log_evaluation(trainer)
        if trainer.cadence.samples(trainer.step):
            self.write_samples(trainer)

    def on_fit_end(self, trainer) -> None:
        self.log_stats(trainer)
        self.bar.close()  # its final state stays on screen; the lines below start on their own line
        self.log_progress(trainer, final=True)
        if self.evaluation and self.evaluation[0] == trainer.step and self._evaluation_logged != trainer.step:
            self.log_evaluation(trainer)
        if not trainer.cadence.samples(trainer.step):  # else on_step_end just wrote this step's grid
            self.write_samples(trainer)
        self.wait_for_samples()  # the last line names them
        if self.is_main:
            self.log_finished(trainer)

    def teardown(self, trainer) -> None:
        if self._first_step_timer is not None:
            self._first_step_timer.cancel()
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._encoder is not None:  # after an error elsewhere the grid in flight is finished, its own error dropped
            self._encoder.shutdown(wait=True)
        for opened in (self.bar, self.writer):
            if opened is not None:
                opened.close()
        self.bar = self.writer = self._encoder = self._writing = None

    def log_stats(self, trainer) -> None:
        """Drain the collected stats into :attr:`stats`, TensorBoard and the bar's postfix."""
        stats = trainer.collector.drain()
        if not stats:  # nothing ran since the last log (e.g. the final call right after a logged step)
            return
        now = self.clock()
        stats["perf/images_per_s"] = (trainer.images_seen - self._images0) / max(now - self._t0, 1e-9)
        for name, scaler in trainer.scalers.items():
            if scaler.is_enabled():
                stats[f"amp/scale/{name}"] = scaler.get_scale()
                stats[f"amp/skipped_steps/{name}"] = float(trainer.guard.skipped_steps[name])
        if trainer.settings.on_nonfinite == "skip":
            stats.update({f"nonfinite/skipped_steps/{n}": float(c) for n, c in trainer.guard.nonfinite_skips.items()})
        self._t0, self._images0 = now, trainer.images_seen
        self.stats = stats
        for name, value in stats.items() if self.writer is not None else ():
            self.writer.add_scalar(name, value, trainer.step)
        self.write_metrics(trainer, stats)
        losses = " ".join(f"{k.removeprefix('loss/')}={v:.3g}" for k, v in main_losses(stats).items())
        self.bar.set_postfix_str(f"{losses} {stats['perf/images_per_s']:.0f} img/s", refresh=False)

    def log_evaluation(self, trainer) -> None:
        """The evaluation of this step (:meth:`on_evaluation`) as scalars and one console line."""
        self._evaluation_logged = trainer.step
        if not self.is_main:
            return
        _, values, best = self.evaluation
        for name, value in values.items():
            self.writer.add_scalar(name, value, trainer.step)
        self.write_metrics(trainer, values)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if not k.startswith("best/"))
        if best is not None:
            shown += f" (best {best['monitor']}={best['value']:.4g} at step {best['step']})"
        log.info("step %d: %s", trainer.step, shown)

    def log_progress(self, trainer, final: bool = False) -> None:
        """A plain progress line (no bar): the first, at most one per ``log_every_n_seconds``, and the final one."""
        now, (last_time, last_step) = self.clock(), self._line
        due = final or last_time is None or now - last_time >= trainer.settings.log_every_n_seconds
        if not self.plain_lines or not due or trainer.step == last_step:  # last_step starts at the first step
            return
        self._line = (now, trainer.step)
        t0, step0 = self._start
        seconds_per_step = (now - t0) / (trainer.step - step0)
        eta = timedelta(seconds=round(seconds_per_step * (trainer.settings.max_steps - trainer.step)))
        shown = [f"{k}={v:.3g}" for k, v in main_losses(self.stats).items()]
        shown += [f"{self.stats['perf/images_per_s']:.0f} img/s", f"ETA {eta}"]
        log.info("step %d/%d: %s", trainer.step, trainer.settings.max_steps, ", ".join(shown), extra=self._extra)

    def write_metrics(self, trainer, values: dict[str, float]) -> None:
        """One line of ``metrics.jsonl``: the step, images seen, the wall time and ``values`` (non-finite: null)."""
        if self._metrics_file is None:
            return
        row = {"step": trainer.step, "images_seen": trainer.images_seen, "wall_time": round(time.time(), 3)}
        row.update({k: float(v) if math.isfinite(v) else None for k, v in values.items()})
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()  # a script following the file sees each line as it is logged

    def log_start(self, trainer) -> None:
        """The line before the first step: which steps run, and what the first one does besides training."""
        s, first = trainer.settings, trainer.step + 1
        doing = [f"the first step compiles the networks (trainer.compile={s.compile})"] if s.compile else []
        shown = f"; {', '.join(doing)}" if doing else ""
        log.info("%s step %d of %d%s", "resuming at" if trainer.step else "starting", first, s.max_steps, shown)

    def log_first_step(self, trainer) -> None:
        """The first progress line, right after this process's first step (its losses come at the first log step)."""
        if self._first_step_timer is not None:
            self._first_step_timer.cancel()
        if self.plain_lines:
            took, max_steps = self.clock() - self._start[0], trainer.settings.max_steps
            log.info("step %d/%d: first step done in %.3g s", trainer.step, max_steps, took, extra=self._extra)

    def log_first_step_running(self, trainer) -> None:
        """The first progress line when the first step takes longer than ``log_every_n_seconds`` (a compile, a slow
        first batch): the timer thread's, only while no step has finished."""
        if trainer.step == self._start[1] and self.plain_lines:
            after, max_steps, step = trainer.settings.log_every_n_seconds, trainer.settings.max_steps, trainer.step
            line = "step %d/%d: step %d still running after %.3g s"
            log.info(line, step, max_steps, step + 1, after, extra=self._extra)

    def log_finished(self, trainer) -> None:
        """The run's last line: where its directory, final checkpoint, last sample grid and TensorBoard are."""
        run_dir, stopped = self.run_dir.resolve(), trainer.stop_reason is not None
        parts = [] if stopped else [f"run directory {run_dir}"]  # a stop's own line names it, with the resume command
        checkpoints = self.checkpoints
        if checkpoints is not None and checkpoints.path.is_file():
            if not stopped:  # ditto the checkpoint
                parts.append(f"checkpoint {checkpoints.path.resolve()}")
            best = self.evaluation and self.evaluation[2]  # the value a sweeper gets
            if best and (checkpoints.folder / "best.ckpt").is_file():
                where = (checkpoints.folder / "best.ckpt").resolve()
                parts.append(f"best {best['monitor']}={best['value']:.6g} at step {best['step']} in {where}")
        if self.grids:
            parts.append("samples " + ", ".join(str(p.resolve()) for p in self.grids))
        log.info(
            "%s at step %d%s; view with: tensorboard --logdir %s",
            f"stopped ({trainer.stop_reason})" if stopped else "finished",
            trainer.step,
            f": {', '.join(parts)}" if parts else "",
            shlex.quote(str(run_dir)),
        )

    def write_samples(self, trainer) -> None:
        """Draw the sample pictures for the background thread to write (its errors are raised here, or at the end)."""
        if not self.is_main or self.sampler is None:
            return
        with trainer.averaged_weights():
            pictures = self.sampler()
        if isinstance(pictures, torch.Tensor):
            pictures = {"samples": pictures}
        grids = {name: picture.float().cpu() for name, picture in pictures.items()}  # (3, H', W') in [0, 1]
        prefix = {name: "" if name == "samples" else f"{name}_" for name in grids}
        paths = {name: self.run_dir / "samples" / f"{prefix[name]}step_{trainer.step:07d}.png" for name in grids}
        self.wait_for_samples()
        self.grids = list(paths.values())
        self._writing = self._encoder.submit(self._write_pictures, grids, paths, trainer.step)

    def _write_pictures(self, grids: dict[str, torch.Tensor], paths: dict[str, Path], step: int) -> None:
        """PNG files and TensorBoard images of ``grids`` (in the background thread; the writer is thread-safe)."""
        for name, grid in grids.items():
            atomic_write(paths[name], partial(_save_image, grid, format="png"), fsync=False)
            self.writer.add_image(name, grid, step)

    def wait_for_samples(self) -> None:
        """Until the grids being written are on disk; raises the error that stopped them, if any."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def open_writer(self, step: int) -> None:
        """TensorBoard's writer, with the config written and flushed: a full disk fails here, in one line, and the
        events file it began is removed (TensorBoard would raise from its own thread later, leaving it empty)."""
        before = set(self.run_dir.glob("events.out.tfevents.*"))
        if threading.excepthook is not _quiet_writer_thread:
            _quiet_writer_thread.default = threading.excepthook  # type: ignore[attr-defined]
            threading.excepthook = _quiet_writer_thread
        try:
            self.writer = SummaryWriter(log_dir=str(self.run_dir))  # writes the file's first record itself
            self.log_config(step)
            self.writer.flush()
        except OSError as e:
            if e.errno not in FULL | NOT_WRITABLE:
                raise
            writer, self.writer = self.writer, None
            with contextlib.suppress(OSError, AttributeError):
                writer.close()
            began = sorted(set(self.run_dir.glob("events.out.tfevents.*")) - before)
            for path in began:
                path.unlink(missing_ok=True)
            raise write_error(e, began[0] if began else self.run_dir) from None

    def log_config(self, step: int) -> None:
        """The config as indented text (a code block), the ``about`` texts, and the hparams row with its metrics."""
        import yaml  # PyYAML comes with hydra/omegaconf

        text = yaml.safe_dump(self.config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), step)
        for title, value in self.about.items():
            self.writer.add_text(title, "    " + value, step)
        row = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()}
        for summary in hparams(row, {tag: 0.0 for tag in self.metric_tags}):
            self.writer._get_file_writer().add_summary(summary)


def _quiet_writer_thread(args) -> None:
    """``threading.excepthook``: TensorBoard's writer thread dies printing a full disk's OSError, which its next write
    re-raises in the main thread (where :meth:`RunLog.open_writer` reports it in one line); anything else is printed."""
    e = args.exc_value
    if isinstance(e, OSError) and e.errno in FULL | NOT_WRITABLE and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _quiet_writer_thread.default(args)  # type: ignore[attr-defined]


def standard_callbacks(
    settings,
    run_dir,
    *,
    checkpoints: Checkpointing | None = None,
    sampler=None,
    evaluator=None,
    eval_tags: Sequence[str] = (),
    config=None,
    hparams: dict | None = None,
    about: dict[str, str] | None = None,
    is_main=True,
    world_size=1,
    read_ahead: DrawnAhead | None = None,
):
    """What every ``python -m gantrain`` run attaches, in ``run_dir``: evaluation and ``best.ckpt`` (when an
    ``evaluator`` returns ``{name: value}``, names among ``eval_tags``, without the global RNG), checkpoints,
    :class:`RunLog` and, last, :class:`~gantrain.readahead.ReadAhead` for a ``read_ahead`` stream that reads files."""
    from gantrain.metrics.loop import Evaluation

    checkpointing = checkpoints or Checkpointing(
        run_dir, settings.resume, config=config, is_main=is_main, keep=settings.keep_checkpoints, world_size=world_size
    )
    evaluation = []
    if evaluator is not None:  # first: a step's results and best.ckpt come before its last.ckpt, which keeps the best
        best = checkpointing.folder / "best.ckpt"
        evaluation = [
            Evaluation(
                evaluator,
                settings.evaluation,
                write_best=lambda trainer: checkpointing.write(trainer, best),
                start_step=lambda: checkpointing.start_step,
                is_main=is_main,
            )
        ]
    metric_tags = list(dict.fromkeys([*eval_tags, settings.monitor]))
    return [  # then checkpoints: resume before anything is logged (logging changes no trained state)
        *evaluation,
        checkpointing,
        RunLog(
            run_dir,
            sampler=sampler,
            config=config,
            hparams=hparams,
            metric_tags=metric_tags,
            about=about,
            is_main=is_main,
            checkpoints=checkpointing,
        ),  # fmt: skip
        *([] if read_ahead is None else [ReadAhead(read_ahead, checkpointing.save, checkpointing.path)]),
    ]


def _save_image(*args, **kwargs) -> None:
    from torchvision.utils import save_image  # imported at the first grid: torchvision takes ~1.5 s to import

    save_image(*args, **kwargs)
