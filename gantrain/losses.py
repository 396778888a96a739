"""Adversarial losses, discriminator penalties and generator-side terms, as small classes the
:class:`~gantrain.objectives.GANObjective` composes.

Every adversarial loss works on raw discriminator outputs ``(B,)``: logits for BCE, critic scores
for the Wasserstein and hinge losses, regression outputs for least squares. ``score`` maps them to
what people plot as ``D(x)`` / ``D(G(z))``.

Penalties (:class:`Penalty`) add a term to D's loss and/or act on D after its optimizer step; a
weight/strength of 0 switches one off. Generator terms (:class:`GeneratorTerm`) add to G's loss.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gantrain import amp, checks
from gantrain.state import Stateful


class AdversarialLoss:
    """Base: the discriminator's loss on (real, fake) outputs and the generator's loss on fake outputs.

    ``g_reads_real``: the generator's loss also reads D's outputs on the real batch, ``g_loss(fake, real)``
    (relativistic losses). The G phase then computes them under the frozen D, without a graph (no gradient can
    reach D, and none flows to G through them). Otherwise ``g_loss(fake)``.
    """

    g_reads_real: bool = False

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_loss(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """What to report as D(x) / D(G(z)) for these outputs."""
        return out

    def d_input(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees for a batch ``x`` (real or fake); instance noise hooks in here."""
        return x


class BCELoss(AdversarialLoss):
    """Goodfellow et al. 2014, from logits with ``binary_cross_entropy_with_logits``.

    D minimises ``-log D(x) - log(1 - D(G(z)))``. The generator uses the non-saturating
    ``-log D(G(z))`` by default; ``saturating=True`` gives the original minimax ``log(1 - D(G(z)))``,
    whose gradient vanishes when D confidently rejects fakes.

    Args:
        label_smoothing: one-sided label smoothing (Salimans et al. 2016, §3.4): D's target for
            reals is ``1 - label_smoothing`` (0.1 -> 0.9); fakes keep target 0.
        instance_noise: std of Gaussian noise added to every D input, real and fake, in both
            phases (Sønderby et al. 2017; Arjovsky & Bottou 2017), so the two distributions overlap.
    """

    def __init__(self, saturating: bool = False, label_smoothing: float = 0.0, instance_noise: float = 0.0):
        checks.number("label_smoothing", label_smoothing, ge=0, lt=1)
        checks.number("instance_noise", instance_noise, ge=0, hint="a std")
        self.saturating, self.label_smoothing, self.instance_noise = saturating, label_smoothing, instance_noise

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real_target = torch.full_like(real, 1.0 - self.label_smoothing)
        return F.binary_cross_entropy_with_logits(real, real_target) + F.binary_cross_entropy_with_logits(
            fake, torch.zeros_like(fake)
        )

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        if self.saturating:
            # log(1 - sigmoid(f)) = -BCE(f, 0)
            return -F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))

    def score(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def d_input(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.instance_noise * torch.randn_like(x) if self.instance_noise > 0 else x


class WassersteinLoss(AdversarialLoss):
    """Arjovsky et al. 2017: the critic maximises E[D(x)] - E[D(G(z))]; needs a Lipschitz constraint
    (:class:`GradientPenalty` or :class:`WeightClip`)."""

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return fake.mean() - real.mean()

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean()


class HingeLoss(AdversarialLoss):
    """Hinge loss (Lim & Ye 2017; Miyato et al. 2018): D ``E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]``,
    G ``-E[D(G(z))]``."""

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean()


class LeastSquaresLoss(AdversarialLoss):
    """LSGAN (Mao et al. 2017): D ``½E[(D(x) - b)²] + ½E[(D(G(z)) - a)²]``, G ``½E[(D(G(z)) - c)²]``.

    The paper's two settings: a=-1, b=1, c=0 (Pearson chi² divergence) and a=0, b=c=1 (the default).
    """

    def __init__(self, a: float = 0.0, b: float = 1.0, c: float = 1.0):
        self.a, self.b, self.c = a, b, c

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((real - self.b) ** 2).mean() + 0.5 * ((fake - self.a) ** 2).mean()

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((fake - self.c) ** 2).mean()


class RelativisticAverageLoss(AdversarialLoss):
    """RaGAN (Jolicoeur-Martineau 2019, "The relativistic discriminator", RaSGAN): D judges whether a real sample is
    more realistic than the average fake, and a fake less realistic than the average real. With ``C`` the raw outputs
    and ``σ`` the logistic function, as in the paper's code (each side halved):

    D: ``½(-E log σ(C(x) - E C(G(z))) - E log(1 - σ(C(G(z)) - E C(x))))``;
    G: ``½(-E log σ(C(G(z)) - E C(x)) - E log(1 - σ(C(x) - E C(G(z)))))``: the roles swapped, so G's loss reads D's
    outputs on the real batch (``g_reads_real``).
    """

    g_reads_real = True

    @staticmethod
    def _loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a`` judged more realistic than the average ``b``, ``b`` less than the average ``a``."""
        ones, zeros = torch.ones_like(a), torch.zeros_like(b)
        more = F.binary_cross_entropy_with_logits(a - b.mean(), ones)
        less = F.binary_cross_entropy_with_logits(b - a.mean(), zeros)
        return 0.5 * (more + less)

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return self._loss(real, fake)

    def g_loss(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return self._loss(fake, real)


class RelativisticPairingLoss(AdversarialLoss):
    """RpGAN (Jolicoeur-Martineau 2019; the loss of R3GAN, Huang et al. 2024): each real sample is paired with the
    fake of the same batch position. D: ``E softplus(C(G(z_i)) - C(x_i))``; G: ``E softplus(C(x_i) - C(G(z_i)))``,
    which reads D's outputs on the real batch (``g_reads_real``). With R1 and R2 it converges locally (R3GAN, §3)."""

    g_reads_real = True

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(fake - real).mean()

    def g_loss(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return F.softplus(real - fake).mean()


# ----------------------------------------------------------------------------------------------
# penalties on D


LAZY = "1 = every D step; k = lazy, weight scaled by k"


class Penalty:
    """A term on D's loss (``__call__``) and/or a constraint applied after each D step (``after_step``).

    ``every``: lazy regularisation (Karras et al. 2020): the term is computed on D steps
    0, k, 2k, ... only, multiplied by k so its average strength is unchanged.
    """

    every: int = 1
    labels: str = "real"  # a conditional D is called with the real batch's labels ("fake": the fakes' labels)
    per_sample_gradient: bool = False  # True: needs D(x_i) to depend on x_i only (no BatchNorm in D)
    double_backward: bool = False  # True: D's loss backpropagates through D's input gradient (keeps D eager)

    @property
    def active(self) -> bool:
        return True

    def __call__(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def after_step(self, d: nn.Module) -> None:
        pass


def _input_gradient(d: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``∇_x sum_i D(x_i)`` per sample, differentiable w.r.t. D's weights (``create_graph``).

    Under ``precision=16-mixed`` the gradient follows PyTorch's AMP recipe (:func:`gantrain.amp.input_gradient`).
    """
    if not x.requires_grad:  # a leaf of its own; an input that already requires grad keeps its graph
        x = x.detach().requires_grad_(True)
    return amp.input_gradient(d(x), x)


class GradientPenalty(Penalty):
    """WGAN-GP (Gulrajani et al. 2017): ``weight * E[(||grad_x D(x_hat)||_2 - center)^2]``.

    ``x_hat = a * real + (1 - a) * fake`` with one ``a ~ U(0, 1)`` per sample. The gradient is
    taken with ``create_graph=True`` so the penalty itself is differentiable w.r.t. D's weights.
    """

    per_sample_gradient = double_backward = True

    def __init__(self, weight: float = 0.0, center: float = 1.0, every: int = 1):
        checks.integer("every", every, at_least=1, hint=LAZY)
        checks.number("weight", weight, ge=0, hint="0 = off; WGAN-GP uses 10")
        self.weight, self.center, self.every = weight, center, every

    @property
    def active(self) -> bool:
        return self.weight > 0

    def __call__(
        self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Penalty for critic ``d``; ``alpha`` ``(B, 1, ..., 1)`` is drawn per sample unless given (tests)."""
        if alpha is None:
            alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
        x_hat = alpha * real + (1 - alpha) * fake  # (B, ...)
        norms = _input_gradient(d, x_hat).flatten(1).norm(2, dim=1)  # (B,)
        return self.weight * ((norms - self.center) ** 2).mean()


class R1Penalty(Penalty):
    """R1 (Mescheder et al. 2018): ``gamma / 2 * E[||grad_x D(x)||^2]`` on real data only."""

    per_sample_gradient = double_backward = True

    def __init__(self, gamma: float = 0.0, every: int = 1):
        checks.integer("every", every, at_least=1, hint=LAZY)
        checks.number("gamma", gamma, ge=0, hint="0 = off; e.g. 10")
        self.gamma, self.every = gamma, every

    @property
    def active(self) -> bool:
        return self.gamma > 0

    def __call__(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        sq = _input_gradient(d, real).flatten(1).pow(2).sum(1)  # (B,)
        return 0.5 * self.gamma * sq.mean()


class R2Penalty(R1Penalty):
    """R2 (Mescheder et al. 2018; with R1 the regulariser of R3GAN, Huang et al. 2024): ``gamma / 2 *
    E[||grad_x D(G(z))||^2]`` on the generated batch; a conditional D sees the fakes' labels."""

    labels = "fake"

    def __call__(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return super().__call__(d, fake, real)


class OutputPenalty(Penalty):
    """A penalty on D's outputs of the D step rather than on D: in place of ``__call__`` the objective calls
    ``outputs(real_out, fake_out, step)`` with the raw outputs its adversarial loss reads (graph kept; fakes detached
    from G)."""

    def outputs(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (float64 stays): squares of half-precision outputs overflow."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LeCamPenalty(OutputPenalty, Stateful):
    """LeCam regularisation (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited Data",
    eq. 3): ``weight * (E[(D(x) - α_F)²] + E[(D(G(z)) - α_R)²])`` on D's raw outputs, where α_R and α_F are exponential
    moving averages (``decay``) of D's mean output on reals and on fakes, zero-debiased as in the authors' StyleGAN2
    code. ``one_sided``: as the authors' code, penalise only D(x) above α_F and D(G(z)) below α_R (relu, then square).

    The anchors are the averages over the applied D steps before this one (the first D step has none: its term is 0);
    after each D step (``after_step``) the mean of its micro-batches' means, averaged over the ranks under DDP, joins
    them. So k accumulated micro-batches act as one batch k times larger and 2 ranks as one process; the authors fold
    the current batch in before the penalty. The averages are state, saved with the checkpoint (``loss.lecam``).
    """

    def __init__(self, weight: float = 0.0, decay: float = 0.99, one_sided: bool = False):
        checks.number("weight", weight, ge=0, hint="0 = off")
        checks.number("decay", decay, ge=0, lt=1, hint="the paper's code: 0.99")
        self.weight, self.decay, self.one_sided = weight, decay, bool(one_sided)
        self.ema: torch.Tensor | None = None  # (2,): the biased averages of D's mean output on reals, on fakes
        self.steps = 0  # D steps averaged into ema
        self._pending: tuple[int, torch.Tensor, int] | None = None  # this D step's (step, sum of means, micro-batches)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def anchors(self) -> torch.Tensor | None:
        """``(α_R, α_F)``, the zero-debiased averages; None before the first D step is done."""
        return None if self.ema is None else self.ema / (1 - self.decay**self.steps)

    def outputs(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> torch.Tensor:
        real, fake = _wide(real), _wide(fake)
        means = torch.stack([real.detach().mean(), fake.detach().mean()])
        if self._pending is None or self._pending[0] != step:  # a new D step; a skipped step's means are dropped
            self._pending = (step, means, 1)
        else:
            self._pending = (step, self._pending[1] + means, self._pending[2] + 1)
        anchors = self.anchors()
        if anchors is None:
            return real.new_zeros(())
        anchors = anchors.to(real)
        above, below = real - anchors[1], anchors[0] - fake
        if self.one_sided:
            above, below = F.relu(above), F.relu(below)
        return self.weight * (above.pow(2).mean() + below.pow(2).mean())

    @torch.no_grad()
    def after_step(self, d: nn.Module) -> None:
        if self._pending is None:
            return
        _, total, count = self._pending
        self._pending, means = None, total / count
        if dist.is_available() and dist.is_initialized():  # every rank keeps the same averages
            dist.all_reduce(means)
            means /= dist.get_world_size()
        ema = torch.zeros_like(means) if self.ema is None else self.ema.to(means)
        self.ema, self.steps = self.decay * ema + (1 - self.decay) * means, self.steps + 1

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.steps, self._pending = state["ema"], int(state["steps"]), None


class WeightClip(Penalty):
    """Original WGAN (Arjovsky et al. 2017): clamp every D parameter to ``[-clip, clip]`` after each D step."""

    def __init__(self, clip: float = 0.0):
        checks.number("clip", clip, ge=0, hint="0 = off; WGAN uses 0.01")
        self.clip = clip

    @property
    def active(self) -> bool:
        return self.clip > 0

    @torch.no_grad()
    def after_step(self, d: nn.Module) -> None:
        for p in d.parameters():
            p.clamp_(-self.clip, self.clip)


# ----------------------------------------------------------------------------------------------
# the auxiliary classifier (ACGAN)


class AuxiliaryClassifier:
    """ACGAN (Odena et al. 2017): D's auxiliary head ``d.classify(features)`` predicts each sample's class.
    D's loss adds ``weight * (CE(real logits, real labels) + CE(fake logits, fake labels))``, G's adds
    ``weight * CE(fake logits, fake labels)``: both maximise the log-likelihood of the right class (the paper's L_C).
    ``d_on_fakes=False`` drops the fake term from D's loss: the classifier then learns the real classes only, so G
    cannot agree with it on a code for its labels that real images of those classes do not carry (in our MNIST runs
    with the term, G drew 4s and 9s as 8-like shapes D had learnt to call 4 and 9). ``weight`` 0 turns it off
    (logged as ``loss/D/aux``, ``loss/G/aux``)."""

    def __init__(self, weight: float = 0.0, d_on_fakes: bool = True):
        checks.number("weight", weight, ge=0, hint="0 = off; ACGAN uses 1")
        self.weight, self.d_on_fakes = weight, d_on_fakes

    @property
    def active(self) -> bool:
        return self.weight > 0

    def d_loss(
        self, real_logits: torch.Tensor, real_y: torch.Tensor, fake_logits: torch.Tensor, fake_y: torch.Tensor
    ) -> torch.Tensor:
        loss = F.cross_entropy(real_logits, real_y)
        if self.d_on_fakes:
            loss = loss + F.cross_entropy(fake_logits, fake_y)
        return self.weight * loss

    def g_loss(self, fake_logits: torch.Tensor, fake_y: torch.Tensor) -> torch.Tensor:
        return self.weight * F.cross_entropy(fake_logits, fake_y)


# ----------------------------------------------------------------------------------------------
# generator-side terms


@runtime_checkable
class FeatureDiscriminator(Protocol):
    """A discriminator split as ``head(features(x))``: what generator terms (feature matching) read D through.
    The DCGAN, ResNet and MLP discriminators are."""

    head: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ClassifyingDiscriminator(FeatureDiscriminator, Protocol):
    """A :class:`FeatureDiscriminator` that can carry an ACGAN auxiliary classifier: ``classifier`` (None when it
    was built without one) and ``classify(h) -> (B, num_classes)`` class logits from ``features(x)``."""

    classifier: nn.Module | None

    def classify(self, h: torch.Tensor) -> torch.Tensor: ...


class GeneratorTerm(nn.Module):
    """A term added to G's loss: ``forward(d, real, fake, fake_features) -> weight * value``.

    ``fake_features`` is ``d.features(fake)``, computed once by the objective for the adversarial
    term too. Terms are modules so a fixed network inside them (VGG) moves with ``.to(device)``.
    """

    weight: float = 0.0

    @property
    def active(self) -> bool:
        return self.weight > 0


def mean_feature_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """``||E f(x) - E f(G(z))||_2^2`` over the batch, features flattened per sample."""
    diff = real_features.flatten(1).mean(0) - fake_features.flatten(1).mean(0)
    return diff.pow(2).sum()


class FeatureMatching(GeneratorTerm):
    """Feature matching (Salimans et al. 2016, §3.1) on D's last hidden layer (``d.features``).

    The real statistics are computed without a graph, so the gradient of this term reaches G only.
    """

    def __init__(self, weight: float = 0.0):
        super().__init__()
        checks.number("weight", weight, ge=0, hint="0 = off")
        self.weight = weight

    def forward(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor, fake_features: torch.Tensor):
        with torch.no_grad():
            real_features = d.features(real)
        return self.weight * mean_feature_distance(real_features, fake_features)
