"""Objectives turn a model into training phases. The Trainer runs phases; it never sees loss types.

A GAN objective supplies a D phase (every iteration) and a G phase (every ``n_critic``
iterations, the phase that counts as a training step).
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from gantrain.augment import Augment, NoAugment
from gantrain.batch import Batch
from gantrain.errors import ConfigError
from gantrain.losses import (
    AdversarialLoss,
    AuxiliaryClassifier,
    ClassifyingDiscriminator,
    FeatureDiscriminator,
    FeatureMatching,
    GeneratorTerm,
    GradientPenalty,
    LeCamPenalty,
    OutputPenalty,
    Penalty,
    R1Penalty,
    R2Penalty,
    WeightClip,
)
from gantrain.models import GenerativeModel
from gantrain.phase import Phase, Update
from gantrain.pictures import samples_picture
from gantrain.state import Stateful
from gantrain.stats import report

Pictures = dict[str, torch.Tensor]  # name -> (3, H, W) picture in [0, 1]; logged under its name


class SharedFakes:
    """The D phase's generator outputs of one iteration, their graph kept, for the G phase right after it.

    pytorch/examples' DCGAN generates once per iteration: D trains on ``fake.detach()``, then G's loss
    backpropagates through the same ``fake`` (into G, after D's update). Under accumulation the D
    phase's k micro-batches leave k fakes and G's k micro-batches take them in order, so G trains on
    exactly what D saw (their k graphs live through D's step: turn reuse off when memory is tight). A
    fake is taken only in the iteration that made it (``step``: both phases' step count, equal at
    n_critic 1) and only for a batch of its size; otherwise G generates afresh. A conditional model's fakes
    travel with the labels they were generated for.
    """

    def __init__(self) -> None:
        self.step = -1
        self.fakes: deque[tuple[torch.Tensor, torch.Tensor | None]] = deque()

    def put(self, step: int, fake: torch.Tensor, y: torch.Tensor | None = None) -> None:
        if step != self.step:  # a new iteration: whatever was left is stale
            self.fakes.clear()
            self.step = step
        self.fakes.append((fake, y))

    def take(self, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if step == self.step and self.fakes and self.fakes[0][0].shape[0] == n:
            return self.fakes.popleft()
        self.fakes.clear()
        return None


@contextmanager
def trainable(module: nn.Module) -> Iterator[None]:
    """Inside the block every parameter of ``module`` requires grad (the Trainer froze it for another phase's
    step); the flags come back afterwards. A graph built inside keeps reaching them, so a later backward
    through it fills their ``.grad`` once they require grad again (in their own phase)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class GANObjective(nn.Module):
    """An adversarial loss plus named terms, each a :class:`Penalty` on D or a :class:`GeneratorTerm` on G.

    ``GANObjective(HingeLoss(), r1=R1Penalty(10), fm=FeatureMatching(1.0))``: the keyword is the
    term's name in the logs (``loss/D/r1``, ``loss/G/fm``) and its config key (``loss.r1.gamma``).
    Inactive terms (weight 0) and ``None`` are dropped, so a config can list every term switched off.

    Reports ``loss/D`` (total), ``loss/D/adv``, ``loss/D/<penalty>``, ``loss/G`` (total),
    ``loss/G/adv``, ``loss/G/<term>``, ``D(x)`` and ``D(G(z))``.

    A conditional model's D sees each batch's labels: the data's for reals, the prior's for fakes; a penalty calls
    D with the labels of the batch it differentiates (``Penalty.labels``: R1 and GP the real ones, R2 the fakes'); an
    :class:`OutputPenalty` (LeCam) gets D's outputs of the D step instead.
    ``aux`` (ACGAN): D's auxiliary classifier head, on the shared features of one D body pass. An adversarial loss
    whose G side reads D's real outputs (``g_reads_real``: RaGAN, RpGAN) gets them in the G phase, computed
    without a graph under the frozen D.

    ``augment`` (the ``augment=`` group, set by :meth:`use_augment`): what every D input goes through, real and fake,
    in both phases, before D and before its penalties (stylegan2-ada): D sees ``adversarial.d_input(augment(x))``.
    G's gradient flows through the augmentation of its fakes; reals carry no graph. An adaptive augmentation reads
    D's outputs on the reals of each D step and adjusts after it. ``augment=none`` changes nothing.

    ``reuse_fakes``: when G steps right after every D step (n_critic 1) and has no generator terms
    (which are defined on a fresh batch), the G step reuses the D step's generated batch, as
    pytorch/examples' DCGAN does (:class:`SharedFakes`): one generator forward per iteration instead of
    two. False: G always draws fresh noise.
    """

    networks = ("g", "d")  # the model's networks this objective trains (each gets optim.<name>)

    def __init__(
        self,
        adversarial: AdversarialLoss,
        gp: GradientPenalty | None = None,
        r1: R1Penalty | None = None,
        r2: R2Penalty | None = None,
        weight_clip: WeightClip | None = None,
        fm: FeatureMatching | None = None,
        perceptual: GeneratorTerm | None = None,
        aux: AuxiliaryClassifier | None = None,
        lecam: LeCamPenalty | None = None,
        reuse_fakes: bool = True,
        **terms: Penalty | GeneratorTerm | None,
    ):
        super().__init__()
        self.adversarial = adversarial
        self.reuse_fakes = reuse_fakes
        self.aux = aux if aux is not None and aux.active else None
        self.penalties: dict[str, Penalty] = {}
        g_terms: dict[str, GeneratorTerm] = {}
        terms = dict(gp=gp, r1=r1, r2=r2, lecam=lecam, weight_clip=weight_clip, fm=fm, perceptual=perceptual, **terms)
        for name, term in terms.items():
            if term is None or not term.active:
                continue
            if isinstance(term, Penalty):
                self.penalties[name] = term
            elif isinstance(term, GeneratorTerm):
                g_terms[name] = term
            else:
                raise ConfigError(f"{name}: {type(term).__name__} is neither a Penalty nor a GeneratorTerm", key=name)
        self.g_terms = nn.ModuleDict(g_terms)  # moves fixed networks (VGG) with .to(device)
        self.augment: Augment = NoAugment()

    def use_augment(self, augment: Augment) -> None:
        """Every D input goes through ``augment`` from now on."""
        self.augment = augment

    def d_view(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of a batch: augmented, then the adversarial loss's input hook (instance noise)."""
        return self.adversarial.d_input(self.augment(x))

    def phases(self, model: GenerativeModel, updates: Mapping[str, Update], n_critic: int = 1) -> list[Phase]:
        """D phase then G phase; G runs every ``n_critic``-th iteration (after the critic's updates).

        ``updates``: each trained network's optimizer, schedule and clipping (from ``optim.<net>``).
        At n_critic 1 the two phases share the generated batch unless ``reuse_fakes`` is off.
        """
        mixing = [type(m).__name__ for m in model.d.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for name, penalty in self.penalties.items():
            if penalty.per_sample_gradient and mixing:
                raise ConfigError(
                    f"{name}: a gradient penalty needs per-sample critic gradients, but D has {mixing[0]}, "
                    "which mixes the samples of a batch; set model.d.norm=layer, instance or none",
                    key=name,
                )
        if self.g_terms and not isinstance(model.d, FeatureDiscriminator):
            name = next(iter(self.g_terms))
            raise ConfigError(
                f"{name}: generator terms need a discriminator with features(x) and "
                f"head(h); {type(model.d).__name__} has not",
                key=name,
            )
        if self.aux is not None:
            if not model.conditional:
                raise ConfigError(
                    "aux.weight: the auxiliary classifier predicts classes, and this model is unconditional; "
                    "set model.conditional=true (on data with labels) or loss.aux.weight=0",
                    key="aux.weight",
                )
            if not isinstance(model.d, ClassifyingDiscriminator) or model.d.classifier is None:
                raise ConfigError(
                    f"aux.weight: needs D's auxiliary classifier head, and {type(model.d).__name__} has none; "
                    "set model.d.aux_classifier=true",
                    key="aux.weight",
                )
        shared = SharedFakes() if self.reuse_fakes and n_critic == 1 and not self.g_terms else None
        d_loss, g_loss = partial(self.d_loss, model, shared=shared), partial(self.g_loss, model, shared=shared)
        return [
            Phase.of("D", model.d, updates["d"], d_loss, after_step=partial(self.after_d_step, model)),
            Phase.of("G", model.g, updates["g"], g_loss, interval=n_critic, counts_as_step=True),
        ]

    def state_parts(self) -> dict[str, Stateful]:
        """The terms whose state the checkpoint keeps (those that subclass :class:`~gantrain.state.Stateful`), by
        their config key (``loss.adversarial``, ``loss.gp``, ...)."""
        terms = {"adversarial": self.adversarial, **self.penalties, **self.g_terms}
        parts = {f"loss.{name}": term for name, term in terms.items() if isinstance(term, Stateful)}
        return {**parts, "augment": self.augment} if isinstance(self.augment, Stateful) else parts

    def double_backward_networks(self) -> dict[str, tuple[str, ...]]:
        """The networks a loss takes a double backward through (its input gradient is part of the loss), each with
        the names of those terms: D under an active gradient penalty or R1. ``trainer.compile`` keeps them eager."""
        terms = tuple(name for name, penalty in self.penalties.items() if penalty.double_backward)
        return {"d": terms} if terms else {}

    def sampler(self, model: GenerativeModel, render: Callable, noise: torch.Tensor, data) -> Callable[[], Pictures]:
        """What a run shows at each sample step: ``samples`` of the fixed ``noise``, drawn by ``render`` (an image grid,
        a scatter plot; a conditional model's: one row per class, :func:`~gantrain.pictures.class_rows`). ``data``: the
        batch stream, for objectives that show real data."""
        return lambda: {"samples": samples_picture(model, render, noise)}

    def d_loss(
        self, model: GenerativeModel, batch: Batch, step: int = 0, shared: SharedFakes | None = None
    ) -> torch.Tensor:
        """D's loss on a real batch; ``step`` (D steps so far) schedules lazy penalties. With ``shared`` the
        generated batch keeps its graph there for the G step; D sees it detached either way."""
        d, x, real = model.d, self.d_view, batch.x
        latents = model.prior(len(batch), real.device)
        if shared is None:
            fake = model.generate(latents).detach()  # no gradient may reach G
        else:
            with trainable(model.g):
                fake = model.generate(latents)
            shared.put(step, fake, latents.y)
            fake = fake.detach()  # D's backward stops here: G's .grad stays untouched
        real_in, fake_in = x(real), x(fake)
        real_labels, fake_labels = model.labels(batch.y), model.labels(latents.y)
        if self.aux is None:
            real_out, fake_out = d(real_in, **real_labels), d(fake_in, **fake_labels)
        else:  # one D body pass serves both heads
            real_h, fake_h = d.features(real_in), d.features(fake_in)
            real_out, fake_out = d.head(real_h, **real_labels), d.head(fake_h, **fake_labels)
        self.augment.observe(real_out, step)
        loss = self.adversarial.d_loss(real_out, fake_out)
        report("loss/D/adv", loss)
        if self.aux is not None:
            aux = self.aux.d_loss(d.classify(real_h), batch.y, d.classify(fake_h), latents.y)
            report("loss/D/aux", aux)
            loss = loss + aux
        for name, penalty in self.penalties.items():
            if step % penalty.every:
                continue
            if isinstance(penalty, OutputPenalty):  # LeCam: reads this step's outputs, not D
                term = penalty.outputs(real_out, fake_out, step)
            else:
                labels = fake_labels if penalty.labels == "fake" else real_labels
                term = penalty(partial(d, **labels) if labels else d, real_in, fake_in)
            if term is None:  # a constraint (weight clipping), not a loss term
                continue
            report(f"loss/D/{name}", term)
            loss = loss + penalty.every * term
        report("loss/D", loss)
        report("D(x)", self.adversarial.score(real_out))
        report("D(G(z))", self.adversarial.score(fake_out))
        return loss

    def after_d_step(self, model: GenerativeModel) -> None:
        for penalty in self.penalties.values():
            penalty.after_step(model.d)
        self.augment.after_d_step()

    def g_loss(
        self, model: GenerativeModel, batch: Batch, step: int = 0, shared: SharedFakes | None = None
    ) -> torch.Tensor:
        """G's loss; the batch the D step generated in this iteration if ``shared`` holds it, else a fresh one."""
        d, x, real = model.d, self.adversarial.d_input, batch.x
        taken = None if shared is None else shared.take(step, len(batch))
        if taken is None:
            latents = model.prior(len(batch), real.device)
            fake, fake_y = model.generate(latents), latents.y
        else:
            fake, fake_y = taken
        fake_labels = model.labels(fake_y)
        fake_seen = self.augment(fake)  # G's gradient flows through the augmentation
        if self.g_terms or self.aux is not None:  # one D body pass serves every term
            fake_features = d.features(x(fake_seen))
            fake_out = d.head(fake_features, **fake_labels)
        else:
            fake_features, fake_out = None, d(x(fake_seen), **fake_labels)
        if self.adversarial.g_reads_real:  # D is frozen in this phase; no graph: nothing flows back through them
            with torch.no_grad():
                real_out = d(self.d_view(real), **model.labels(batch.y))
            loss = self.adversarial.g_loss(fake_out, real_out)
        else:
            loss = self.adversarial.g_loss(fake_out)
        report("loss/G/adv", loss)
        if self.aux is not None:
            aux = self.aux.g_loss(d.classify(fake_features), fake_y)
            report("loss/G/aux", aux)
            loss = loss + aux
        for name, term in self.g_terms.items():
            value = term(d, self.augment(real), fake_seen, fake_features)  # both sides augmented alike
            report(f"loss/G/{name}", value)
            loss = loss + value
        report("loss/G", loss)
        return loss
