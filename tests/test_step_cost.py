"""Step cost: one generator forward per iteration where the maths allows it (``loss.reuse_fakes``), and
per-step bookkeeping without host reads between logging steps."""

from __future__ import annotations

import copy
import errno
import importlib
import os
import platform
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from gantrain import allocator, runlog
from gantrain.batch import Batch
from gantrain.build import build
from gantrain.errors import NonFiniteError
from gantrain.events import Callback
from gantrain.files import WriteError
from gantrain.runlog import RunLog
from gantrain.stats import FOLD, Collector
from tests.conftest import REPO, HostCopies, make_cfg
from tests.test_nonfinite import AtStep, checkpoint_files, nan_in_adversarial_term


class SameBatch:
    """The one real batch, for every draw (the G phase draws one too, for its size); resumable like BatchStream."""

    def __init__(self, real: torch.Tensor):
        self.real, self.draws = real, 0

    def __next__(self) -> Batch:
        self.draws += 1
        return Batch(self.real)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]


def test_one_dcgan_iteration_equals_the_pytorch_examples_iteration(tmp_path):
    """Acceptance 1: float64, BatchNorm-free DCGAN; one Trainer iteration and pytorch/examples' iteration
    (D on real and ``fake.detach()``, D's step, then G's loss through the same ``fake``, D frozen) fed the
    same real batch and noise: the same D and G gradients and weights (1e-9 relative)."""
    cfg = make_cfg("+experiment=dcgan", "model.g.norm=none", "model.d.norm=none", "trainer.max_steps=1")
    trainer = build(cfg, tmp_path)
    model = trainer.model.double()
    g, d = copy.deepcopy(model.g), copy.deepcopy(model.d)  # the hand loop's networks, same initial weights
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.randn(8, *model.g.latent_shape, generator=gen, dtype=torch.float64)
    latents = [z, torch.randn_like(z)]  # a G step that drew fresh noise would get the second one
    model.noise = lambda n, device, generator=None: latents.pop(0)
    trainer.data = SameBatch(real)
    for callback in trainer.callbacks:
        if isinstance(callback, RunLog):  # no sample grid: the model is float64 now, its fixed noise float32
            callback.sampler = None
    trainer.fit()
    assert len(latents) == 1  # one generator forward in the iteration

    # pytorch/examples/dcgan/main.py, one iteration (its criterion is BCE on sigmoid outputs; D gives logits)
    adam = {"lr": cfg.optim.d.lr, "betas": tuple(cfg.optim.d.optimizer.betas)}
    assert cfg.optim.g.lr == adam["lr"] and tuple(cfg.optim.g.optimizer.betas) == adam["betas"]
    opt_d, opt_g = torch.optim.Adam(d.parameters(), **adam), torch.optim.Adam(g.parameters(), **adam)
    d.zero_grad()
    output = d(real)
    F.binary_cross_entropy_with_logits(output, torch.ones_like(output)).backward()
    fake = g(z)
    output = d(fake.detach())
    F.binary_cross_entropy_with_logits(output, torch.zeros_like(output)).backward()
    opt_d.step()
    g.zero_grad()
    d.requires_grad_(False)  # (pytorch/examples lets D's .grad collect G's loss too; the Trainer freezes D)
    output = d(fake)
    F.binary_cross_entropy_with_logits(output, torch.ones_like(output)).backward()
    opt_g.step()

    for name, hand, ours in (("D", d, model.d), ("G", g, model.g)):
        for (n, p), q in zip(hand.named_parameters(), ours.parameters()):
            assert p.grad.abs().sum() > 0, f"{name} {n}: no gradient (the comparison could not fail)"
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-15, msg=f"{name} {n}.grad")
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-9, atol=1e-15, msg=f"{name} {n}")


@pytest.mark.parametrize(
    "overrides, reused",
    [
        ([], True),
        (["loss.reuse_fakes=false"], False),
        (["trainer.n_critic=2"], False),  # G steps after two D steps: D's last batch is not G's to take
        (["loss.fm.weight=1"], False),  # a generator term is defined on a fresh batch
        (["+experiment=wgan_gp", "trainer.n_critic=1"], True),
    ],
    ids=["dcgan", "switched-off", "n_critic-2", "feature-matching", "wgan_gp-n_critic-1"],
)
def test_the_objective_decides_when_g_reuses_the_d_steps_batch(tmp_path, overrides, reused):
    trainer = build(make_cfg(*overrides, "trainer.max_steps=2"), tmp_path)
    forwards = []
    trainer.model.g.register_forward_hook(lambda *_: forwards.append(trainer.iteration))
    trainer.fit()
    n_critic = trainer.phases[1].interval
    per_step = n_critic + (0 if reused else 1)
    assert len(forwards) == 2 * per_step + 1  # + the final sample grid


# ----------------------------------------------------------------------------- bookkeeping between logging steps
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def record_gantrain_reads(monkeypatch, where) -> list:
    """Every tensor value gantrain's own code reads on the host (``.item()``, ``.tolist()``, ``bool(t)``, ...),
    each as ``where()`` at the read; on a GPU each would make the host wait for the device."""
    reads = []
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def read(self, *args, _original=original):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("gantrain"):
                reads.append(where())
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, read)
    return reads


@pytest.mark.parametrize("every_step", [False, True], ids=["deferred", "cpu"])
def test_no_host_reads_between_logging_steps(tmp_path, monkeypatch, every_step):
    """Deferred checks (an accelerator under ``stop``): gantrain reads no tensor inside a phase step, and outside
    them only at logging steps (3, 6). On the CPU the check reads its values once per phase step."""
    trainer = build(make_cfg("trainer.max_steps=6", "trainer.log_every_n_steps=3"), tmp_path)
    trainer.guard.check_every_step = every_step
    in_phase = [False]
    run_phase = trainer.run_phase

    def phase_step(phase):
        in_phase[0] = True
        try:
            run_phase(phase)
        finally:
            in_phase[0] = False

    trainer.run_phase = phase_step
    reads = record_gantrain_reads(monkeypatch, lambda: (trainer.step, in_phase[0]))
    trainer.fit()
    monkeypatch.undo()
    outside = {step for step, inside in reads if not inside}
    inside = [step for step, inside in reads if inside]
    assert outside == {3, 6}
    assert inside == ([s for s in range(6) for _phase in "DG"] if every_step else [])


def test_deferred_checks_stop_at_the_next_read_naming_the_first_bad_step(tmp_path, monkeypatch):
    """NaN in D's term at step 3, read at step 4 (a checkpoint step): the error names step 3, and the
    checkpoint of step 2 is the one on disk, byte for byte."""
    cfg = make_cfg("trainer.max_steps=8", "trainer.log_every_n_steps=4", "trainer.checkpoint_every_n_steps=2")
    trainer = build(cfg, tmp_path)
    trainer.guard.check_every_step = False
    nan_in_adversarial_term(monkeypatch, trainer, "D", steps=(3,))
    trainer.callbacks.append(before := AtStep(2, tmp_path))
    with pytest.raises(
        NonFiniteError, match=r"^step 3, phase D: loss/D/adv is nan; found when the checks were read at step 4 "
    ):
        trainer.fit()
    assert trainer.step == 4 and before.files and checkpoint_files(tmp_path) == before.files


def test_collector_means_and_one_read_per_drain(monkeypatch):
    collector = Collector()
    values = [torch.tensor(float(i)) for i in range(FOLD + 3)]  # folds once
    for v in values:
        collector.add("a", v)
    collector.add("b", 2.0)
    collector.add("b", torch.tensor(4.0))
    collector.add("c", torch.tensor([1.0, 2.0, 6.0]))  # a tensor counts as its mean
    reads = record_gantrain_reads(monkeypatch, lambda: None)
    stats = collector.drain()
    assert len(reads) == 1
    assert stats == {"a": pytest.approx((FOLD + 2) / 2), "b": 3.0, "c": 3.0}
    assert collector.drain() == {}


@pytest.mark.parametrize(
    "overrides",
    [
        ["+experiment=dcgan"],
        ["+experiment=hinge_sngan"],
        ["+experiment=lsgan"],
        ["+experiment=cgan_pd"],
        ["+experiment=acgan"],
        ["+experiment=dcgan", "augment=ada", "loss.lecam.weight=0.1"],
        ["+experiment=dcgan", "augment=diffaugment", "loss.fm.weight=1"],
    ],
    ids=lambda o: " ".join(o),
)
def test_the_gan_losses_copy_nothing_from_the_host_to_a_gpu(tmp_path, overrides):
    """Two D and G loss passes (the first moves ADA's p and LeCam's means to the device) on fake CUDA tensors make no
    blocking host-to-GPU copy, each of which would synchronise the GPU. Forward only: without a GPU, autograd cannot
    run backward on fake CUDA tensors (the CUDA test below covers whole steps where there is one)."""
    from hydra.utils import instantiate
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gantrain.batch import Batch
    from gantrain.stats import Collector, collecting

    cfg = make_cfg(*overrides, "trainer.device=cpu")
    model, objective = build(cfg, tmp_path).model, instantiate(cfg.loss)
    objective.use_augment(instantiate(cfg.augment))
    with FakeTensorMode(allow_non_fake_inputs=True), collecting(Collector()):
        model.to("cuda")
        y = torch.arange(8, device="cuda") % 10 if model.conditional else None
        batch = Batch(x=torch.zeros(8, 1, 32, 32, device="cuda"), y=y)
        for step in range(2):
            with HostCopies() as copies:  # the copies of the second pass are the ones asserted
                objective.d_loss(model, batch, step=step)
                objective.after_d_step(model)
                objective.g_loss(model, batch, step=step)
    assert copies.seen == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("augment", ["none", "diffaugment", "ada"])
def test_no_device_sync_between_logging_steps_on_cuda(tmp_path, augment):
    """CUDA, fp32, ``stop``: from the end of step 1 (the epoch's order is copied to the device there) every
    phase step and every callback of a non-logging step runs without one synchronising CUDA call, also with D's
    inputs augmented (ADA adjusting p every D step)."""
    overrides = ["trainer.device=cuda", "trainer.max_steps=6", "trainer.log_every_n_steps=3", f"augment={augment}"]
    if augment == "ada":
        overrides.append("augment.adjust_every=1")
    trainer = build(make_cfg(*overrides), tmp_path)
    assert not trainer.guard.check_every_step
    read = trainer.read_deferred_checks

    def read_checks():  # a logging step's reads are allowed
        torch.cuda.set_sync_debug_mode("default")
        read()

    class Watch(Callback):  # last in the list: after this step's logging, until the next read
        def on_step_end(self, trainer):
            torch.cuda.set_sync_debug_mode("error")

    trainer.read_deferred_checks = read_checks
    trainer.callbacks.append(Watch())
    try:
        trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.step == 6


def test_sample_grids_are_written_in_the_background_and_their_errors_stop_the_run(tmp_path, monkeypatch):
    """The PNG of step 2 fails on a full disk in the background thread: the run stops at the next grid (step 3)
    with that error's one line; step 1's grid is on disk."""
    trainer = build(make_cfg("trainer.max_steps=5", "trainer.sample_every_n_steps=1"), tmp_path)
    threads, save = [], runlog._save_image

    def save_image(grid, fp, format=None):
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "samples"))
        save(grid, fp, format=format)

    monkeypatch.setattr(runlog, "_save_image", save_image)
    with pytest.raises(WriteError, match=r"^cannot write '.*step_0000002.png': No space left on device"):
        trainer.fit()
    assert trainer.step == 3 and all(name.startswith("gantrain-samples") for name in threads)
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step_0000001.png"]


@pytest.mark.parametrize("recipe", ["dcgan", "wgan_gp", "vae"])
def test_the_benchmarks_hand_loops_train_the_recipes_networks(monkeypatch, recipe):
    """scripts/hand_loops.py, bench.py's baselines: each has the recipe's parameter shapes and takes a step."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bench, hand_loops = importlib.import_module("bench"), importlib.import_module("hand_loops")
    bench.same_networks(recipe)
    lines: list[str] = []
    loop = hand_loops.LOOPS[recipe](hand_loops.digits(), log=lines.append)
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in loop.networks().items()}
    loop.step(0)
    assert len(lines) == 1
    for name, net in loop.networks().items():  # every network trained (a critic's last bias gets no gradient)
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), name


def test_the_augment_and_ada_cost_tables_share_a_work_folder_and_divide_long_minus_short(monkeypatch, tmp_path):
    """bench.py --augment --ada: both tables time a `none` side; each gets its own run folders (they once collided)
    and its ratio is (long - short) per step of its first side over its second's. The processes' times are faked."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bench = importlib.import_module("bench")

    def wall_time(cmd, log, env):  # 1 s to start, then 10 ms a step; 30 % more with diffaugment, 60 % with ada
        steps = int(next(a for a in cmd if a.startswith("trainer.max_steps=")).split("=")[1])
        cost = 1.3 if "augment=diffaugment" in cmd else 1.6 if "augment=ada" in cmd else 1.0
        return 1.0 + 0.01 * cost * steps

    monkeypatch.setattr(bench, "wall_time", wall_time)
    rows = [bench.variant_table(name, 2, None, tmp_path)[-1] for name in ("augment", "ada")]
    assert rows == [
        "| dcgan | (20, 120) | 13.0 | 10.0 | **1.300** | 1.300, 1.300 |",
        "| dcgan | (20, 120) | 16.0 | 10.0 | **1.600** | 1.600, 1.600 |",
    ]


STEP_FAULTS = """
import resource, sys, tempfile, torch
from gantrain.allocator import keep_freed_memory
from gantrain.stats import collecting
from gantrain.build import build
from gantrain.train import compose_config
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    trainer = build(compose_config("+experiment=dcgan", "data.batch_size=16", "trainer.device=cpu"), tmp)
    faults = []
    with collecting(trainer.collector):
        for _ in range(8):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for phase in trainer.phases:
                trainer.run_phase(phase)
            trainer.iteration += 1
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[4:]))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_the_entry_points_allocator_settings_reuse_a_steps_pages(monkeypatch):
    """DCGAN steps (64-wide, batch 16): under glibc's defaults every step faults thousands of fresh pages in
    (memory freed by the previous step went back to the kernel); with ``keep_freed_memory()``, which
    ``python -m gantrain`` calls, steps 5-8 reuse the pages of the earlier ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(REPO)
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run(
            [sys.executable, "-c", STEP_FAULTS, mode], env=env, capture_output=True, text=True, check=True
        )
        faults[mode] = int(done.stdout)
    assert faults["default"] > 4000 and faults["keep"] < 1000, faults  # page faults in steps 5-8
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # a user's own setting is kept
    assert not allocator.keep_freed_memory()
