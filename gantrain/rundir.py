"""The run directory: one run at a time (an exclusive lock), default names unique per launch, the configs
saved there, its ``train.log`` and the command that resumes it.

A run holds ``<run_dir>/.lock`` (``fcntl.flock``) from before it checks or writes anything until it exits; the kernel
drops the lock when the process dies, however it dies, so there is no stale lock to clean up. A second process on the
same directory stops at once with one line naming the holder. The lock file of a run that passed its checks is never
deleted (deleting a locked file lets a third process lock a new one beside it); a run refused before that removes the
lock file and the folders it created (:func:`make_dirs`), so that it leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import socket
import sys
import uuid
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gantrain.checkpoint import MAY_CHANGE_ON_RESUME
from gantrain.errors import GantrainError
from gantrain.files import FULL, NOT_WRITABLE, atomic_write, write_error
from gantrain.hydra_errors import user_error

LOCK_NAME = ".lock"
LOG_FILE = "train.log"
log = logging.getLogger("gantrain")


class RunDirectoryInUse(GantrainError):
    """Another live process holds the run directory."""


class RunDirectoryLock:
    """Exclusive lock on a run directory for the life of a run (``with RunDirectoryLock(d) as lock:``). Entering creates
    the directory if needed and takes the lock or raises :class:`RunDirectoryInUse`, writing nothing else;
    :meth:`claim`, once the run passed its checks, records PID and host for the next process's message."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.claimed = self.new = False

    def __enter__(self) -> "RunDirectoryLock":
        try:
            make_dirs(self.run_dir)
            if _job_dir_of_sweep(self.run_dir):  # Hydra made it for this job just now
                _CREATED.setdefault(self.run_dir.absolute(), self.run_dir.absolute())
            self.new = not self.path.exists()  # a refused run removes a lock file it created (then nothing waits on it)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in NOT_WRITABLE:
                raise write_error(e, e.filename or self.path) from None
            raise
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; runs are not protected from each other
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "a process that is starting"
            os.close(self.fd)
            self.fd = None
            raise RunDirectoryInUse(
                f"run directory '{self.run_dir}' is in use by another gantrain run ({holder}); wait for it "
                "to finish, or pick another hydra.run.dir"
            ) from None
        return self

    def claim(self) -> None:
        """Write this process's PID and host into the lock file (only after the run passed its checks,
        so a refused run leaves the file as it was)."""
        if self.fd is not None:
            text = f"PID {os.getpid()} on {socket.gethostname()}\n".encode()
            try:  # written before the old text is cut, so that a full disk leaves that text as it was
                os.pwrite(self.fd, text, 0)
                os.ftruncate(self.fd, len(text))
            except OSError as e:  # a full disk: refused like any check, so the directory goes if it was new
                raise (write_error(e, self.path) if e.errno in FULL | NOT_WRITABLE else e) from None
        self.claimed = True

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            if not self.claimed and self.new:  # a refused run leaves nothing behind: its lock file, its new folders
                self.path.unlink(missing_ok=True)
                remove_created(self.run_dir)
            os.close(self.fd)  # releases the flock
            self.fd = None


# run directory -> the highest folder this process created for it (see make_dirs); only these are ever removed
_CREATED: dict[Path, Path] = {}


def make_dirs(folder: str | Path) -> None:
    """``mkdir -p folder``, remembering the folders it created, so that a run refused before it wrote anything takes
    them away again (:func:`remove_created`); a folder that existed before is never removed."""
    folder = Path(folder).absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    if missing:
        _CREATED.setdefault(folder, missing[-1])


def remove_created(folder: str | Path) -> None:
    """Remove ``folder`` and the parents :func:`make_dirs` created with it, while they are empty."""
    folder = Path(folder).absolute()
    top = _CREATED.pop(folder, None)
    for p in (folder, *folder.parents) if top is not None else ():
        try:
            p.rmdir()
        except OSError:  # not empty (another run's folder beside it) or gone
            return
        if p == top:
            return


def _job_dir_of_sweep(folder: Path) -> bool:
    """Whether ``folder`` is an empty job directory of a Hydra sweep (which Hydra creates right before the job)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return folder.is_dir() and not any(folder.iterdir())


def unique_suffix() -> str:
    """A short id that makes a default run directory unique among launches in the same second
    (the ``${unique:}`` resolver in ``hydra.run.dir``; cached, so one value per process)."""
    return uuid.uuid4().hex[:6]


def run_name(overrides: Sequence[str], prefix: str = "", swept: str = "") -> str:
    """A run's directory name from its command-line ``overrides`` (``${run_name:...}`` in train.yaml): each
    ``key=value`` as ``key-value``, joined by ``_``; of a sweep job only the ``swept`` keys (comma-separated), the
    rest being the same in every job (the sweep's ``multirun.yaml``). Left out: ``experiment`` (the folder), ``hydra``
    keys and the keys a resumed run may change (``MAY_CHANGE_ON_RESUME``: ``trainer.resume``, ``trainer.max_steps``,
    ...), swept or not, so that a sweep rerun with them changed finds its jobs. Characters other than letters, digits
    and ``_.+-`` become ``_``: the name is a valid unquoted override value (``hydra.run.dir=...``,
    ``trainer.resume=...``) and a shell word. A long name is cut, with a hash of the whole so that it stays unique and
    the same on every rerun.
    ``prefix`` comes first; "" when nothing is left."""
    keys = {k for k in swept.split(",") if k}
    words = []
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if names_the_run(key) and (key in keys or not keys):
            words.append(f"{_safe(key)}-{_safe(value)}")
    name = "_".join(words)
    if len(name) > 120:
        name = name[:100] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return prefix + name if name else ""


def names_the_run(key: str) -> bool:
    """Whether an overridden ``key`` enters the run directory's name (see :func:`run_name`)."""
    if key in ("experiment", "hydra") or key.startswith(("hydra.", "hydra/")):
        return False
    return not any(fnmatch(key, pattern) for pattern in MAY_CHANGE_ON_RESUME)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def hydra_value(text: str) -> str:
    """``text`` as the value of a ``key=value`` override: as it is when Hydra reads it back unchanged, else in quotes
    (a path with a space, ``=``, ``,``, brackets, ...), with Hydra's escapes (a backslash before a quote or at the
    end is doubled, the quote escaped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    quoted = []
    for q in ("'", '"'):
        inner = re.sub(rf"(\\*){q}", lambda m, q=q: m.group(1) * 2 + "\\" + q, text)
        quoted.append(q + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, inner) + q)
    for candidate in (text, *quoted):
        try:
            if parser.parse_override(f"k={candidate}").value() == text:
                return candidate
        except Exception:  # noqa: BLE001 - not valid this way; try the next
            continue
    raise GantrainError(f"cannot write {text!r} as the value of a Hydra override")


class CreateRunDirectory(HydraCallback):
    """Hydra callback (``hydra.callbacks``): create the run (or sweep) directory before Hydra, so that one that cannot
    be created is one line and exit 1, not Hydra's traceback."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._create(_folder(config, "run"), "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        n_jobs = config.hydra.launcher.get("n_jobs", 1)  # hydra/launcher=parallel (joblib): 0 has no meaning there
        if "joblib" in str(config.hydra.launcher.get("_target_")) and not (n_jobs is None or _nonzero_int(n_jobs)):
            must = "an integer >= 1 (the jobs run at once) or < 0 (-1: one per CPU core, -2: all but one, ...)"
            print(f"gantrain: error: hydra.launcher.n_jobs={n_jobs!r}: must be {must}", file=sys.stderr)
            raise SystemExit(1)
        self._create(_folder(config, "sweep"), "hydra.sweep.dir")

    @staticmethod
    def _create(folder: str, key: str) -> None:
        try:
            make_dirs(folder)
        except OSError as e:
            logging.getLogger("gantrain").error(
                "%s=%s: cannot create this directory (%s); choose a directory you can write to",
                key,
                folder,
                e.strerror or e,
            )
            raise SystemExit(1) from None


def _nonzero_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value != 0


def _folder(config: Any, kind: str) -> str:
    """``hydra.<kind>.dir``. The default names hold the overrides, so an override whose ``${...}`` cannot resolve fails
    here first: one line naming that override's key (Hydra would print a warning naming ``hydra.run.dir``)."""
    try:
        return str(config.hydra[kind].dir)
    except OmegaConfBaseException as e:
        err: BaseException = e
        try:
            OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True)
        except OmegaConfBaseException as job_error:
            err = job_error
        print(f"gantrain: error: {user_error(err) or err}", file=sys.stderr)  # as the entry point prints it
        raise SystemExit(1) from None


def save_configs(cfg: DictConfig, run_dir: Path) -> None:
    """``config.yaml`` (resolved: what actually ran; Hydra's copy keeps the ``${...}``) and, under Hydra,
    the ``.hydra/`` files Hydra itself would have written before the run was checked (``hydra.output_subdir``
    is null in train.yaml so that a refused run changes nothing in an existing directory)."""
    save = lambda node, path, resolve=False: atomic_write(  # noqa: E731  (a full disk: one line, the old file kept)
        path, lambda f: f.write(OmegaConf.to_yaml(node, resolve=resolve).encode()), fsync=False
    )
    save(cfg, run_dir / "config.yaml", resolve=True)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        save(cfg, run_dir / ".hydra" / "config.yaml")
        save(OmegaConf.create({"hydra": hydra_cfg}), run_dir / ".hydra" / "hydra.yaml")
        save(hydra_cfg.overrides.task, run_dir / ".hydra" / "overrides.yaml")


# ``extra=`` of a record for train.log only, not the console (the progress lines while a tqdm bar shows them there)
FILE_ONLY = {"gantrain_file_only": True}


def not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "gantrain_file_only", False)


class HeldLines(logging.Handler):
    """Holds the log lines of a run's start (loading the data, building the networks: which network stays eager
    under ``trainer.compile``, an optimizer a recipe does not use, a checkpoint's warnings) while the run may still
    be refused, so that :func:`log_file` writes them first into ``train.log`` once the run passed its checks; a
    refused run drops them (its one line went to the console) and leaves no ``train.log``. A context manager that
    attaches itself to the root logger."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> HeldLines:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


@contextmanager
def log_file(path: Path, held: HeldLines | None = None):
    """Copy every log line to ``path`` (the run's ``train.log``, appended across resumes) inside the block,
    in the console handler's format, after the lines ``held`` holds from before; :data:`FILE_ONLY` records go
    there and not to the console. Opened only after the run passed its checks."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
    console = next((h for h in consoles if h.formatter), None)
    fmt = console.formatter if console else logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s")
    handler.setFormatter(fmt)
    if held is not None:
        root.removeHandler(held)
        for record in held.records:
            handler.handle(record)
        held.records.clear()
    root.addHandler(handler)
    for h in consoles:
        h.addFilter(not_file_only)
    try:
        yield
    except Exception as e:
        err = user_error(e)
        if err is not None:  # a user error's one line goes into train.log too; the entry point won't repeat it
            log.error("%s", err)
            e.gantrain_logged = True  # type: ignore[attr-defined]
        raise
    finally:
        for h in consoles:
            h.removeFilter(not_file_only)
        root.removeHandler(handler)
        handler.close()


def stop_message(run_dir: Path, signal_name: str, step: int, max_steps: int) -> str:
    """What a run stopped by a signal says: the step, its checkpoint and the command that continues it (the same
    overrides, this directory, ``trainer.resume=auto``), quoted so that it works pasted into a shell."""
    overrides = ["<the same overrides>"]
    if HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
        overrides = [o for o in task if not re.match(r"(trainer\.resume|hydra\.run\.dir)=", o)]
    words = ["python", "-m", "gantrain", *overrides, f"hydra.run.dir={hydra_value(str(run_dir.resolve()))}"]
    words.append("trainer.resume=auto")
    command = " ".join(w if w.startswith("<") else shlex.quote(w) for w in words)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return f"stopped by {signal_name} after step {step}/{max_steps}; checkpoint: {ckpt}; resume with: {command}"
