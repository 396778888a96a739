"""Reading a step's batches before the step starts, so a file that cannot be read stops a run at a step boundary.

Data read from disk during training (``data=folder`` with ``in_memory=false``) can fail hours in: a file whose pixel
data is corrupt. Drawn inside a step, after the first phase already took its optimizer step, the error would leave no
consistent state to save. :class:`ReadAhead` draws the next step's batches at the end of each step instead; if one
cannot be read, the step just completed is checkpointed and the run stops with one line naming the file, to be continued
with ``trainer.resume=auto`` once the file is replaced (or with the data's skip option).

The stream's order is a pure function of its position (no global RNG), so drawing early changes nothing computed.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

from gantrain.data import DataError
from gantrain.events import Callback

log = logging.getLogger(__name__)


class DrawnAhead:
    """A batch stream with batches drawn ahead of use; ``state_dict`` is the position of the next one used."""

    in_memory = False

    def __init__(self, stream: Any):
        self.stream = stream
        self.pending: deque[tuple[dict, Any]] = deque()  # (stream state before the batch, batch)

    def draw(self, n: int) -> None:
        """Hold the next ``n`` batches (raises what the stream raises, e.g. a DataError naming a file)."""
        while len(self.pending) < n:
            state = self.stream.state_dict()
            self.pending.append((state, next(self.stream)))

    def __iter__(self):
        return self

    def __next__(self):
        return self.pending.popleft()[1] if self.pending else next(self.stream)

    def state_dict(self) -> dict:
        return self.pending[0][0] if self.pending else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pending.clear()
        self.stream.load_state_dict(state)


def drawn_ahead(stream: Any) -> Any:
    """The stream the trainer draws from: ``stream`` itself when its data is in memory (or generated: nothing left
    to read), else a :class:`DrawnAhead` of it for :class:`ReadAhead`."""
    return stream if stream.in_memory else DrawnAhead(stream)


class ReadAhead(Callback):
    """For data streamed from files: read each step's batches before it starts; checkpoint and stop when one fails.
    ``drawn``: the data stream (:func:`drawn_ahead`); ``save``: :meth:`~gantrain.checkpoint.Checkpointing.save`;
    ``path``: where, for the message. Goes after the callbacks that resume and log (so it starts at the resumed position
    and the step it stops after is logged)."""

    def __init__(self, drawn: DrawnAhead, save: Callable[[Any], None], path: Any):
        self.drawn, self.save, self.path = drawn, save, path

    def on_fit_start(self, trainer) -> None:
        self._draw(trainer, saved=False)

    def on_step_end(self, trainer) -> None:
        self._draw(trainer, saved=True)

    def _draw(self, trainer, saved: bool) -> None:
        if trainer.step >= trainer.settings.max_steps:  # no step left to read for
            return
        try:
            self.drawn.draw(trainer.cadence.batches_of_next_step(trainer.iteration))
        except DataError as e:
            if saved:
                self.save(trainer)
                then = f"the run stopped after step {trainer.step}, saved in '{self.path}'"
            elif trainer.step:  # resumed: nothing trained since the checkpoint, nothing written
                then = f"the run stopped at step {trainer.step}, where it resumed"
            else:
                raise
            raise DataError(f"{e}; {then}: continue it with trainer.resume=auto") from None
