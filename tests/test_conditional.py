"""Labels through the training loop (issue 23): the conditional objective's D and G losses by hand, phase isolation
with the ACGAN head and the relativistic G loss's real outputs, k micro-batches equal to one large batch, and
conditional runs of every GAN family end to end (2 ranks equal 1 process: tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gantrain.batch import Batch, Latents
from gantrain.build import build
from gantrain.losses import AuxiliaryClassifier, R2Penalty, RelativisticPairingLoss
from gantrain.models import GenerativeModel
from gantrain.models.dcgan import Discriminator, Generator
from gantrain.objectives import GANObjective
from gantrain.runlog import RunLog
from gantrain.stats import Collector, collecting
from gantrain.train import train
from tests.conftest import make_cfg

# ACGAN's head and a projection, the relativistic pairing loss, R1 and R2: every way a label reaches D
EVERY_PATH = [
    "+experiment=acgan",
    "loss=rpgan",
    "loss.aux.weight=1",
    "loss.r1.gamma=1",
    "loss.r2.gamma=1",
    "model.d.norm=none",
    "model.d.projection=true",
]


def tiny_conditional(classes: int = 3) -> GenerativeModel:
    torch.manual_seed(0)
    g = Generator(nz=4, ngf=4, channels=1, resolution=8, num_classes=classes)
    d = Discriminator(ndf=4, channels=1, resolution=8, norm="none", num_classes=classes, aux_classifier=True)
    return GenerativeModel(g, d, 8, 1, conditional=True, num_classes=classes)


def test_conditional_losses_match_a_hand_computation_from_the_labelled_networks():
    """RpGAN + ACGAN + R2 on a projection D: the logged terms equal the same losses computed by hand from
    d(x, y), d.classify(d.features(x)) and the labels the prior drew (real labels for reals, drawn ones for fakes)."""
    model = tiny_conditional()
    objective = GANObjective(RelativisticPairingLoss(), r2=R2Penalty(2.0), aux=AuxiliaryClassifier(0.5))
    real = Batch(torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 2, 1, 0]))
    d = model.d
    with collecting(Collector()) as c:
        torch.manual_seed(1)
        objective.d_loss(model, real)
        d_stats = c.drain()
        torch.manual_seed(2)
        objective.g_loss(model, real)
        g_stats = c.drain()
    torch.manual_seed(1)
    latents = model.prior(6)
    assert latents.y is not None and latents.y.dtype == torch.int64 and int(latents.y.max()) < 3
    fake = model.generate(latents).detach()
    real_out, fake_out = d(real.x, real.y), d(fake, latents.y)
    assert d_stats["loss/D/adv"] == pytest.approx(F.softplus(fake_out - real_out).mean().item(), rel=1e-5)
    aux = F.cross_entropy(d.classify(d.features(real.x)), real.y) + F.cross_entropy(
        d.classify(d.features(fake)), latents.y
    )
    assert d_stats["loss/D/aux"] == pytest.approx(0.5 * aux.item(), rel=1e-5)
    x = fake.requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x, latents.y).sum(), x)  # R2 with the fakes' labels
    assert d_stats["loss/D/r2"] == pytest.approx(0.5 * 2.0 * grad.flatten(1).pow(2).sum(1).mean().item(), rel=1e-5)
    torch.manual_seed(2)
    latents = model.prior(6)
    fake = model.generate(latents).detach()
    fake_out = d(fake, latents.y)
    g_adv = F.softplus(d(real.x, real.y) - fake_out).mean()
    assert g_stats["loss/G/adv"] == pytest.approx(g_adv.item(), rel=1e-5)
    g_aux = 0.5 * F.cross_entropy(d.classify(d.features(fake)), latents.y)
    assert g_stats["loss/G/aux"] == pytest.approx(g_aux.item(), rel=1e-5)
    # the labels matter: with other labels for the same fakes, the adversarial term differs
    assert F.softplus(fake_out - real_out).mean().item() != pytest.approx(
        F.softplus(d(fake, (latents.y + 1) % 3) - real_out).mean().item(), rel=1e-4
    )


def test_with_labels_a_g_step_leaves_d_alone_and_a_d_step_leaves_g_alone(tmp_path):
    """One D step then one G step of a conditional run with every label path: each changes only its own network,
    and the G step's relativistic real outputs and ACGAN head leave D's weights and gradients untouched."""
    trainer = build(make_cfg(*EVERY_PATH), tmp_path)
    d_phase, g_phase = trainer.phases
    model = trainer.model

    def snapshot(net):
        return [p.detach().clone() for p in net.parameters()], [
            None if p.grad is None else p.grad.clone() for p in net.parameters()
        ]

    with collecting(Collector()) as c:
        g_before, g_grads = snapshot(model.g)
        d_before, _ = snapshot(model.d)
        trainer.run_phase(d_phase)
        assert all(torch.equal(a, b) for a, b in zip(g_before, model.g.parameters()))
        assert all(a is None or not a.any() for a in snapshot(model.g)[1])  # no gradient reached G
        assert any(not torch.equal(a, b) for a, b in zip(d_before, model.d.parameters()))
        d_after_d, d_grads = snapshot(model.d)
        trainer.run_phase(g_phase)
        assert all(torch.equal(a, b) for a, b in zip(d_after_d, model.d.parameters()))
        for before, p in zip(d_grads, model.d.parameters()):  # the G step adds nothing to D's gradients
            assert (before is None and p.grad is None) or torch.equal(before, p.grad)
        assert any(not torch.equal(a, b) for a, b in zip(g_before, model.g.parameters()))
    stats = c.drain()
    assert {"loss/D/aux", "loss/D/r1", "loss/D/r2", "loss/G/aux", "loss/G/adv"} <= stats.keys()
    assert model.d.head.classifier is not None and model.d.head.projection


class LabelledBatches:
    """The given (images, labels) in order, as Batches."""

    def __init__(self, batches: list[Batch]):
        self.batches, self.i = batches, 0

    def __next__(self) -> Batch:
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self) -> dict:
        return {"i": self.i}


@pytest.mark.parametrize("reuse", [True, False], ids=["shared-fakes", "fresh-fakes"])
def test_k_labelled_micro_batches_equal_one_large_batch(tmp_path, reuse):
    """k=4 micro-batches of b and one batch of 4b, float64, BatchNorm-free (G: a label embedding on the noise): same
    gradients and weights with labels on reals and fakes, a projection D with ACGAN's head, RpGAN and R2."""
    k, b, classes = 4, 3, 10
    gen = torch.Generator().manual_seed(0)
    windows, latent_windows = 2, 1 if reuse else 2
    reals = [torch.rand(b, 1, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(windows * k)]
    real_y = [torch.randint(classes, (b,), generator=gen) for _ in range(windows * k)]
    noises = [torch.randn(b, 100, 1, 1, generator=gen, dtype=torch.float64) for _ in range(latent_windows * k)]
    fake_y = [torch.randint(classes, (b,), generator=gen) for _ in range(latent_windows * k)]

    def run(name: str, micro: int) -> tuple[dict, dict]:
        cat = lambda xs: [torch.cat(xs[i : i + micro]) for i in range(0, len(xs), micro)]  # noqa: E731
        batches = [Batch(x, y) for x, y in zip(cat(reals), cat(real_y))]
        z, y = cat(noises), cat(fake_y)
        cfg = make_cfg(
            "+experiment=acgan",
            "loss=rpgan",
            "loss.r2.gamma=1",
            "model.g.norm=none",
            "model.d.norm=none",
            "model.d.projection=true",
            f"loss.reuse_fakes={reuse}",
            f"data.batch_size={b * micro}",
            f"trainer.accumulate_grad_batches={k // micro}",
            "trainer.max_steps=1",
        )
        trainer = build(cfg, tmp_path / name)
        trainer.model.double()
        trainer.data = LabelledBatches(batches)
        for callback in trainer.callbacks:
            if isinstance(callback, RunLog):
                callback.sampler = None  # float64 model, float32 fixed noise
        trainer.model.prior = lambda n, device, generator=None: Latents(z.pop(0), y.pop(0))
        grads: dict[str, list[torch.Tensor]] = {}
        for phase in trainer.phases:
            phase.optimizer.register_step_pre_hook(
                lambda opt, *_, _n=phase.name, _m=phase.module: grads.__setitem__(
                    _n, [p.grad.clone() for p in _m.parameters()]
                )
            )
        trainer.fit()
        assert z == [] and y == [] and trainer.data.i == len(batches)
        return grads, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    grads_micro, params_micro = run("micro", 1)
    grads_big, params_big = run("big", k)
    assert grads_big.keys() == {"D", "G"}
    for phase in grads_big:
        assert torch.nn.utils.get_total_norm(grads_big[phase]) > 1e-6
        for gm, gb in zip(grads_micro[phase], grads_big[phase]):
            torch.testing.assert_close(gm, gb, rtol=1e-9, atol=1e-15)
    for name in params_big:
        torch.testing.assert_close(params_micro[name], params_big[name], rtol=1e-9, atol=1e-12)
    assert "g.embed.weight" in params_big and "d.head.embed.weight" in params_big


@pytest.mark.parametrize(
    "overrides",
    [
        ["+experiment=cgan_pd"],
        ["+experiment=acgan"],
        ["+experiment=toy_gan", "model.conditional=true", "data=grid25"],
        ["+experiment=hinge_sngan", "model.conditional=true", "loss=ragan", "model.fake_labels=data"],
        ["+experiment=cvae", "data=digits"],
    ],
    ids=["cgan_pd", "acgan", "toy-grid25", "ragan-data-frequencies", "cvae"],
)
def test_conditional_runs_train_resume_and_save_their_classes(tmp_path, overrides):
    """Two steps, then resumed to four: the saved config says how many classes, the weights hold the labels'
    tables, the resumed run continues."""
    cfg = make_cfg(*overrides)
    metrics = train(cfg, tmp_path)
    assert metrics["step"] == 2
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    classes = 25 if "data=grid25" in overrides else 10
    assert ckpt["config"]["model"]["conditional"] and ckpt["config"]["model"]["num_classes"] == classes
    resumed = train(make_cfg(*overrides, "trainer.max_steps=4", "trainer.resume=auto"), tmp_path)
    assert resumed["step"] == 4


def test_fake_labels_follow_the_datas_class_frequencies_when_asked(tmp_path):
    """model.fake_labels=data: the prior draws the fakes' labels with the training set's class counts (the build
    hands them over from the stream); uniform otherwise."""
    trainer = build(make_cfg("+experiment=cgan_pd", "model.fake_labels=data"), tmp_path)
    model = trainer.model
    counts = torch.bincount(trainer.data.labels)
    assert torch.equal(model.class_weights, counts.float())  # digits: 1,797 images, 174-183 per class
    model.class_weights = torch.tensor([0.0, 3.0, 1.0] + [0.0] * 7)
    torch.manual_seed(0)
    y = model.prior(40_000).y
    assert set(y.unique().tolist()) == {1, 2} and (y == 1).double().mean().item() == pytest.approx(0.75, abs=0.01)
    model.fake_labels = "uniform"
    assert set(model.prior(1000).y.unique().tolist()) == set(range(10))
