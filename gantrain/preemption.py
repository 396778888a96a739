"""Stopping on a signal without losing work: SIGTERM (a scheduler's kill, ``kill``), SIGINT (Ctrl-C) and
SIGUSR1 (SLURM's ``--signal=USR1@120``, sent before the time limit).

The handler only asks the trainer to stop (:meth:`~gantrain.trainer.Trainer.request_stop`): the step in flight
finishes, ``on_fit_end`` writes the checkpoint at that step, and the entry point exits with 128 + the signal number
(143, 130, 138: what a shell reports for a process killed by that signal). Further signals while stopping are
ignored: the checkpoint being written is not cut off (it is written atomically anyway).
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(signal.Signals[n] for n in ("SIGTERM", "SIGINT", "SIGUSR1") if n in signal.Signals.__members__)


class Received:
    """The first stop signal that arrived (``signum`` None while none has)."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


@contextmanager
def stop_on_signals(trainer) -> Iterator[Received]:
    """Inside the block, SIGTERM/SIGINT/SIGUSR1 make ``trainer`` stop after its step in flight. Handlers can only be
    installed from the main thread; elsewhere (a thread-pool sweep launcher) the block runs with the signals' previous
    behaviour."""
    received = Received()

    def handler(signum, frame) -> None:
        if received.signum is None:
            received.signum = signum
            trainer.request_stop(received.name)
            log.warning("%s received: finishing step %d, then saving a checkpoint", received.name, trainer.step + 1)
        else:
            log.warning("%s received: already stopping, the checkpoint is being written", signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
