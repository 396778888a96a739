"""The run's timetable, computed in one place: which phases run at a loop iteration, how many batches the next
training step draws, and at which steps logging, sample grids, evaluation and checkpoints fall. The Trainer,
the callbacks, the read-ahead, the non-finite guard and the DDP barriers ask it instead of re-deriving it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Cadence:
    """``intervals``: each phase's interval in loop iterations, in run order; ``counting``: the phase whose
    optimizer steps are the training steps; the periods are in training steps (``eval_every`` 0: at the end)."""

    intervals: Sequence[tuple[str, int]]
    counting: str
    accumulate: int = 1
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 500
    eval_every: int = 0

    @classmethod
    def of(cls, settings, phases) -> Cadence:
        """From :class:`~gantrain.settings.TrainerSettings` and the phases (name, interval, counts_as_step)."""
        return cls(
            tuple((p.name, p.interval) for p in phases),
            next(p.name for p in phases if p.counts_as_step),
            settings.accumulate_grad_batches,
            settings.log_every_n_steps,
            settings.sample_every_n_steps,
            settings.checkpoint_every_n_steps,
            settings.eval_every_n_steps,
        )

    def due(self, iteration: int) -> list[str]:
        """The phases that run in loop iteration ``iteration`` (0-based): those whose interval divides it + 1, so a
        G phase of interval ``n_critic`` follows ``n_critic`` D steps."""
        return [name for name, interval in self.intervals if (iteration + 1) % interval == 0]

    def batches_of_next_step(self, iteration: int) -> int:
        """Batches drawn by the iterations from ``iteration`` up to and including the next counting phase (every
        phase draws ``accumulate`` per optimizer step)."""
        n = 0
        while True:
            due = self.due(iteration)
            n += len(due) * self.accumulate
            iteration += 1
            if self.counting in due:
                return n

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0

    def samples(self, step: int) -> bool:
        return step % self.sample_every == 0

    def checkpoints(self, step: int) -> bool:
        return step % self.checkpoint_every == 0

    def evaluates(self, step: int) -> bool:  # periodically; the evaluation at the end is the callback's own
        return bool(self.eval_every) and step % self.eval_every == 0

    def writes(self, step: int) -> bool:
        """Whether anything is logged, drawn, evaluated or saved after ``step``: where deferred checks must be read."""
        return self.logs(step) or self.samples(step) or self.checkpoints(step) or self.evaluates(step)
