"""The run directory: one run at a time (an exclusive lock), and default names unique per launch.

A run holds ``<run_dir>/.lock`` (``fcntl.flock``) from before it checks or writes anything until
it exits; the kernel drops the lock when the process dies, however it dies, so there is no stale
lock to clean up. A second process on the same directory stops at once with one line naming the
holder. The lock file itself is never deleted (deleting a locked file lets a third process lock a
new one beside it).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from gantrain.errors import GantrainError
from gantrain.files import NOT_WRITABLE, write_error

LOCK_NAME = ".lock"


class RunDirectoryInUse(GantrainError):
    """Another live process holds the run directory."""


class RunDirectoryLock:
    """Exclusive lock on a run directory for the life of a run (``with RunDirectoryLock(d) as lock:``).

    Entering creates the directory if needed and takes the lock or raises :class:`RunDirectoryInUse`;
    it writes nothing else. Call :meth:`claim` once the run has passed its checks: it records this
    process (PID and host) in the lock file for the next process's message.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "RunDirectoryLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
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
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text, 0)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def unique_suffix() -> str:
    """A short id that makes a default run directory unique among launches in the same second
    (the ``${unique:}`` resolver in ``hydra.run.dir``; cached, so one value per process)."""
    return uuid.uuid4().hex[:6]


class CreateRunDirectory(HydraCallback):
    """Hydra callback (``hydra.callbacks`` in train.yaml): create the run (or sweep) directory before Hydra
    does, so that a directory that cannot be created (no permission, a read-only or missing mount) is one
    line and exit 1 instead of Hydra's traceback."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._create(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._create(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _create(folder: str, key: str) -> None:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            logging.getLogger("gantrain").error(
                "%s=%s: cannot create this directory (%s); choose a directory you can write to",
                key,
                folder,
                e.strerror or e,
            )
            raise SystemExit(1) from None
