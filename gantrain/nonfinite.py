"""``trainer.on_nonfinite``: the check of every optimizer step for a NaN or an infinity, and what follows.

The Trainer hands each phase step's values to :class:`NonFiniteGuard` before applying the update (see
:mod:`gantrain.trainer` for when the check reads them at once and when it defers the read): ``stop`` raises
:class:`~gantrain.errors.NonFiniteError` naming the step, the phase and the first bad term; ``skip`` drops
the step, counts it, and stops after ``max_consecutive_skips`` in a row (the fp16 scaler's skips count too).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gantrain.cadence import Cadence
from gantrain.errors import NonFiniteError
from gantrain.settings import NonFiniteSettings
from gantrain.stats import first_nonfinite

log = logging.getLogger("gantrain.trainer")

SKIP_WARNINGS = 10  # skips of a phase that each get a warning line; after that every 100th
DEFERRED_CHECKS = 1024  # phase steps whose deferred non-finite checks may wait for a logging step
REMEDIES = "lower the learning rate (optim.<net>.lr), clip gradients (trainer.gradient_clip_val)"


class NonFiniteGuard:
    """Checks, counters (per phase name; saved in checkpoints: :meth:`state_dict`) and deferred reads.

    ``cadence``: when the run writes anything (the deferred checks are read before it does)."""

    def __init__(
        self,
        settings: NonFiniteSettings,
        phase_names: list[str],
        device: torch.device,
        fp16: bool,
        model: nn.Module,
        cadence: Cadence,
    ):
        self.settings, self.device, self.fp16, self.model, self.cadence = settings, device, fp16, model, cadence
        self.skipped_steps = {name: 0 for name in phase_names}  # optimizer steps the fp16 scaler skipped
        self.nonfinite_skips = {name: 0 for name in phase_names}  # steps on_nonfinite=skip dropped
        self.skips_in_a_row = {name: 0 for name in phase_names}  # of either kind, up to the phase's last step
        # read each step's check before applying it (see gantrain.trainer), else defer the reads
        self.check_every_step = device.type == "cpu" or settings.on_nonfinite == "skip" or fp16
        self.deferred: list[tuple[int, str, list[str], torch.Tensor]] = []  # (step, phase, names, values)

    def check(self, step: int, phase: str, reported, losses, overflows, grad_norm, named) -> tuple[str | None, bool]:
        """(what is non-finite at ``step`` of ``phase`` under ``skip``, or None; whether the gradients are
        finite), with one sync; under ``stop`` a non-finite value raises.

        Under fp16 the scaler owns non-finite gradients, and a loss made non-finite by an overflow of
        a scaled input gradient (:mod:`gantrain.amp`); a loss that is non-finite by itself is ours.
        """
        terms = [(name, v) for name, v in reported if name.startswith("loss/")]
        terms += [(f"loss/{phase}", loss) for loss in losses]  # what the loss returned, after its terms
        device = grad_norm.device
        values = [
            v.float().to(device) if isinstance(v, torch.Tensor) else torch.full((), float(v), device=device)
            for _, v in terms
        ]
        values = torch.stack(values + [grad_norm.float()])
        if not self.check_every_step:
            self.deferred.append((step, phase, [name for name, _ in terms] + [f"grad_norm/{phase}"], values))
            return None, True
        finite = torch.isfinite(values)
        if overflows:
            finite = torch.cat([finite, ~torch.stack(overflows)])
        ok = finite.tolist()  # the one host sync of the step
        n = len(terms)
        if all(ok):
            return None, True
        bad = next((i for i in range(n) if not ok[i]), None)
        if bad is not None and not (self.fp16 and not all(ok[n + 1 :])):
            name, value = terms[bad]
            problem, finite_grads = f"{name} is {value.item()}", ok[n]
        elif ok[n] or self.fp16:
            return None, ok[n]
        else:
            first = next((name for name, p in named if not torch.isfinite(p.grad).all()), None)
            where = f"first non-finite gradient: {first}" if first else "finite gradients whose norm overflows"
            problem, finite_grads = f"grad_norm/{phase} is {grad_norm.item()} ({where})", False
        if self.settings.on_nonfinite == "stop":
            raise NonFiniteError(
                f"step {step}, phase {phase}: {problem}; this update was not applied and no checkpoint is written; "
                f"{REMEDIES}, find the op with trainer.detect_anomaly=true, or drop such steps with "
                "trainer.on_nonfinite=skip"
            )
        return problem, finite_grads

    def reads_due(self, step: int) -> bool:
        """Whether the deferred checks are read before this step's callbacks: a logging, sample, checkpoint or
        evaluation step (neither checkpoint nor best.ckpt is written from weights a bad step has reached), or
        enough of them waiting."""
        return len(self.deferred) >= DEFERRED_CHECKS or self.cadence.writes(step)

    def read(self, step: int) -> None:
        """Read the checks deferred since the last read (one host sync); a NaN/inf stops the run, naming the first."""
        deferred, self.deferred = self.deferred, []
        if not deferred:
            return
        values = torch.cat([v for *_, v in deferred])
        ok = torch.isfinite(values).tolist()
        if all(ok):
            return
        first = ok.index(False)
        bad_step, phase, name = [(s, phase, name) for s, phase, names, _ in deferred for name in names][first]
        raise NonFiniteError(
            f"step {bad_step}, phase {phase}: {name} is {values[first].item()}; found when the checks "
            f"were read at step {step} (on {self.device.type} they wait on the device until a logging, sample "
            f"or checkpoint step), so the updates since were applied, and no checkpoint is written; {REMEDIES}, "
            "find the op with trainer.detect_anomaly=true, or drop such steps with trainer.on_nonfinite=skip "
            "(checked at every step)"
        )

    def skipped(self, step: int, phase: str, problem: str) -> None:
        """``on_nonfinite=skip`` dropped this step: count it, with a warning line (the first few, then every 100th)."""
        where = f"step {step}, phase {phase}"
        buffer = first_nonfinite(dict(self.model.named_buffers()))
        if buffer is not None:  # written by the forward pass; dropping the step cannot undo that
            raise NonFiniteError(
                f"{where}: {problem} and the forward pass left NaN/inf in the buffer {buffer}, which skipping the "
                f"step cannot undo; {REMEDIES}"
            )
        self.nonfinite_skips[phase] += 1
        n = self.nonfinite_skips[phase]
        if n <= SKIP_WARNINGS or n % 100 == 0:
            log.warning("%s: %s; step skipped (%d so far: nonfinite/skipped_steps/%s)", where, problem, n, phase)
        self.count_skip(step, phase, problem)

    def scaler_skipped(self, step: int, phase: str, scale: float) -> None:
        """The fp16 scaler did not step (inf/NaN in the scaled gradients)."""
        self.skipped_steps[phase] += 1
        self.count_skip(step, phase, f"the fp16 loss scale kept overflowing (now {scale:g})")

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {
            "skipped_steps": {name: int(n) for name, n in self.skipped_steps.items()},
            "nonfinite_skips": dict(self.nonfinite_skips),
            "skips_in_a_row": dict(self.skips_in_a_row),
        }

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        for key, counts in (("skipped_steps", self.skipped_steps), ("nonfinite_skips", self.nonfinite_skips)):
            counts.update(state.get(key, {}))
        self.skips_in_a_row.update(state.get("skips_in_a_row", {}))

    def applied(self, phase: str) -> None:
        """An optimizer step of ``phase`` went through: its run of skipped steps ends."""
        self.skips_in_a_row[phase] = 0

    def count_skip(self, step: int, phase: str, problem: str) -> None:
        """One more dropped step in a row of ``phase``; ``max_consecutive_skips`` of them stop the run."""
        self.skips_in_a_row[phase] += 1
        n, limit = self.skips_in_a_row[phase], self.settings.max_consecutive_skips
        if n >= limit:
            raise NonFiniteError(
                f"step {step}, phase {phase}: {n} optimizer steps in a row skipped "
                f"(trainer.max_consecutive_skips={limit}), the last because {problem}; the weights are those before "
                f"them; {REMEDIES}, or train with another trainer.precision"
            )
