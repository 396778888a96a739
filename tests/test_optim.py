"""gantrain.optim (schedules, Lookahead, foreach/fused selection) and the optim config options.

Expected values come from closed forms and update rules written out here, not from the code under test.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError
from torch import optim

from gantrain.config import CONFIG_DIR
from gantrain.errors import ConfigError
from gantrain.optim import Lookahead, Schedule, implementation_kwargs, make_optimizer
from gantrain.train import compose_config

BASE_LR = 0.1
TOTAL = 20
MIN_LR = 0.01
KINDS = {  # kind -> Schedule arguments
    "constant": {},
    "step": {"step_size": 5, "gamma": 0.5},
    "cosine": {"min_lr": MIN_LR},
    "exponential": {"gamma": 0.8},
    "linear": {},
}


def expected_lr(kind: str, i: int, warmup: int, total: int = TOTAL) -> float:
    """The LR optimizer step i (0-based) should use, written out from the schedule's definition."""
    if i < warmup:
        return BASE_LR * (i + 1) / warmup
    t, horizon = i - warmup, max(total - warmup, 1)
    if kind == "constant":
        return BASE_LR
    if kind == "step":
        return BASE_LR * 0.5 ** (t // 5)
    if kind == "cosine":
        return MIN_LR + (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * t / horizon)) / 2
    if kind == "exponential":
        return BASE_LR * 0.8**t
    if kind == "linear":
        return BASE_LR * (1 - t / horizon)
    raise AssertionError(kind)


def sgd(lr: float = BASE_LR) -> torch.optim.SGD:
    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=lr)


def run_lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The LR each of ``steps`` optimizer steps uses: read it, step the optimizer, then the scheduler."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_schedule_matches_closed_form(kind, warmup):
    opt = sgd()
    sched = Schedule(kind=kind, warmup_steps=warmup, **KINDS[kind]).build(opt, total_steps=TOTAL)
    got = run_lrs(opt, sched, TOTAL)
    want = [expected_lr(kind, i, warmup) for i in range(TOTAL)]
    for i, (g, w) in enumerate(zip(got, want)):
        assert math.isclose(g, w, rel_tol=1e-12), (i, g, w)
    if warmup > 1:
        assert got[warmup - 1] == BASE_LR and got[0] == BASE_LR / warmup
    # After the last step the schedule sits at the end of its horizon: t = horizon.
    end = opt.param_groups[0]["lr"]
    if kind == "linear":
        assert end == 0.0
    elif kind == "cosine":
        assert end == MIN_LR


@pytest.mark.parametrize("kind", list(KINDS))
def test_schedule_without_warmup_is_torchs_own(kind):
    opt = sgd()
    got = run_lrs(opt, Schedule(kind=kind, **KINDS[kind]).build(opt, total_steps=TOTAL), TOTAL)
    ref_opt = sgd()
    lrs = torch.optim.lr_scheduler
    ref = {
        "constant": lambda: lrs.ConstantLR(ref_opt, factor=1.0, total_iters=0),
        "step": lambda: lrs.StepLR(ref_opt, step_size=5, gamma=0.5),
        "cosine": lambda: lrs.CosineAnnealingLR(ref_opt, T_max=TOTAL, eta_min=MIN_LR),
        "exponential": lambda: lrs.ExponentialLR(ref_opt, gamma=0.8),
        "linear": lambda: lrs.LinearLR(ref_opt, start_factor=1.0, end_factor=0.0, total_iters=TOTAL),
    }[kind]()
    assert got == run_lrs(ref_opt, ref, TOTAL)


def test_schedule_warmup_resumes_from_state_dicts():
    """Optimizer + scheduler state saved mid-warm-up and after it continue the same LR sequence."""
    schedule = Schedule(kind="cosine", warmup_steps=3, min_lr=MIN_LR)
    opt = sgd()
    full = run_lrs(opt, schedule.build(opt, TOTAL), TOTAL)
    for split in (2, 7):
        opt = sgd()
        sched = schedule.build(opt, TOTAL)
        head = run_lrs(opt, sched, split)
        buf = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf)
        opt2 = sgd(lr=0.5)  # its own lr is replaced by the checkpoint's
        sched2 = schedule.build(opt2, TOTAL)
        opt2.load_state_dict(saved["opt"])
        sched2.load_state_dict(saved["sched"])
        assert head + run_lrs(opt2, sched2, TOTAL - split) == full


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "cos"}, "kind='cos': must be "),
        ({"warmup_steps": -1}, "warmup_steps=-1: must be "),
        ({"step_size": 0}, "step_size=0: must be "),
        ({"kind": "step", "gamma": 0.0}, "gamma=0.0: must be "),
        ({"kind": "exponential", "gamma": 1.5}, "gamma=1.5: must be "),
        ({"min_lr": -1e-3}, "min_lr=-0.001: must be "),
    ],
)
def test_schedule_rejects_bad_values(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Schedule(**kwargs)
    assert str(err.value).startswith(key)
    if "kind" in key:
        assert "must be one of constant, step, cosine, exponential, linear" in str(err.value)


def test_schedule_warns_when_warmup_outlasts_the_run(caplog):
    with caplog.at_level(logging.WARNING):
        Schedule(warmup_steps=5).build(sgd(), total_steps=5)
    assert "warmup_steps=5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Schedule(warmup_steps=4).build(sgd(), total_steps=5)
    assert caplog.text == ""


# ----------------------------------------------------------------------------- Lookahead
def scalar_param(value: float = 1.0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([value], dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.5, 0.3])  # 0.3: alpha and 1 - alpha differ
def test_lookahead_matches_hand_computed_weights(alpha):
    k, lr = 3, 0.1
    xs = [1.0, 0.5, 2.0, 1.5, 0.25, 3.0]  # 2k steps
    w = scalar_param()
    la = Lookahead(torch.optim.SGD([w], lr=lr), k=k, alpha=alpha)
    fast = slow = 1.0
    for i, x in enumerate(xs):
        la.zero_grad()
        (0.5 * w**2 * x**2).sum().backward()
        la.step()
        fast -= lr * fast * x**2  # d/dw 0.5 w^2 x^2 = w x^2
        if (i + 1) % k == 0:
            slow += alpha * (fast - slow)
            fast = slow
        assert math.isclose(w.item(), fast, rel_tol=1e-12, abs_tol=1e-15), (i, w.item(), fast)
        assert math.isclose(la.slow[0].item(), slow, rel_tol=1e-12, abs_tol=1e-15), (i, la.slow[0].item(), slow)
    assert la.counter == 2 * k
    assert fast != 1.0 and slow != 1.0 and fast == slow  # it moved, and the last step was a sync


def _toy_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(9)]
    return model, batches


def _train(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_lookahead_state_dict_round_trip_mid_window_is_bit_identical():
    k = 3
    model, batches = _toy_problem()
    start = copy.deepcopy(model.state_dict())
    reference = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=k, alpha=0.5)
    _train(model, reference, batches)
    want = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(start)
    first = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=k, alpha=0.5)
    _train(model, first, batches[:4])  # mid-window: slow weights != fast weights, counter 4
    assert not torch.equal(first.slow[0], model.weight.detach())
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed_model = torch.nn.Linear(3, 1)
    resumed_model.load_state_dict(saved["model"])
    resumed = Lookahead(torch.optim.SGD(resumed_model.parameters(), lr=0.5, momentum=0.9), k=k, alpha=0.5)
    resumed.load_state_dict(saved["optim"])
    assert resumed.counter == 4 and resumed.param_groups[0]["lr"] == 0.05
    assert resumed.param_groups is resumed.base.param_groups and resumed.state is resumed.base.state
    _train(resumed_model, resumed, batches[4:])
    for p, w in zip(resumed_model.parameters(), want):
        assert torch.equal(p.detach(), w)


def test_lookahead_load_state_dict_rejects_other_settings():
    w = scalar_param()
    la = Lookahead(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
    state = la.state_dict()
    with pytest.raises(ValueError, match="k=3, alpha=0.5"):
        Lookahead(torch.optim.SGD([scalar_param()], lr=0.1), k=4, alpha=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(torch.optim.SGD([scalar_param()], lr=0.1), k=3, alpha=0.8).load_state_dict(state)
    with pytest.raises(ValueError, match="2 slow tensors"):
        Lookahead(torch.optim.SGD([scalar_param()], lr=0.1), k=3).load_state_dict({**state, "slow": [w, w]})
    with pytest.raises(ValueError, match="not a Lookahead state_dict"):
        la.load_state_dict(torch.optim.SGD([w], lr=0.1).state_dict())


def test_lookahead_shares_param_groups_with_the_base():
    w = scalar_param()
    base = torch.optim.SGD([w], lr=0.1)
    la = Lookahead(base, k=2)
    assert la.param_groups is base.param_groups and la.state is base.state and la.defaults is base.defaults
    sched = torch.optim.lr_scheduler.StepLR(la, step_size=1, gamma=0.5)
    w.grad = torch.ones_like(w)
    la.step()
    sched.step()
    assert base.param_groups[0]["lr"] == 0.05
    assert math.isclose(w.item(), 1.0 - 0.1, rel_tol=1e-12)  # the first step ran at the old lr
    la.zero_grad()
    assert w.grad is None


def test_lookahead_under_grad_scaler_steps_the_unscaled_gradient():
    w = scalar_param()
    la = Lookahead(torch.optim.SGD([w], lr=0.1), k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale((3.0 * w).sum()).backward()
    scaler.step(la)
    scaler.update()
    assert math.isclose(w.item(), 1.0 - 0.1 * 3.0, rel_tol=1e-12) and la.counter == 1


def test_lookahead_deepcopy_keeps_its_structure():
    w = scalar_param()
    la = Lookahead(torch.optim.SGD([w], lr=0.1), k=2)
    twin = copy.deepcopy(la)
    assert twin.param_groups is twin.base.param_groups and twin.slow[0] is not la.slow[0]
    assert twin.k == 2 and twin.counter == 0


@pytest.mark.parametrize(("kwargs", "key"), [({"k": 0}, "lookahead.k=0"), ({"alpha": 1.5}, "lookahead.alpha=1.5")])
def test_lookahead_rejects_bad_values(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Lookahead(torch.optim.SGD([scalar_param()], lr=0.1), **kwargs)
    assert str(err.value).startswith(key)


# ----------------------------------------------------------------------------- implementations
CUDA = torch.device("cuda")  # only inspected, so no GPU needed


@pytest.mark.parametrize(
    "cls", [optim.Adam, optim.AdamW, optim.SGD, optim.Adagrad, optim.RMSprop, optim.Adadelta, optim.Adamax, optim.NAdam]
)
def test_auto_is_torchs_default_off_cuda(cls):
    assert implementation_kwargs(cls, torch.device("cpu")) == {}
    assert implementation_kwargs(cls, "cpu", "default") == {}
    assert implementation_kwargs(cls, CUDA, "default") == {}


@pytest.mark.parametrize(
    ("cls", "want"),
    [
        (optim.Adam, {"fused": True}),
        (optim.AdamW, {"fused": True}),
        (optim.SGD, {"fused": True}),
        (optim.Adagrad, {"fused": True}),
        (optim.RMSprop, {"foreach": True}),
        (optim.Adadelta, {"foreach": True}),
        (optim.Adamax, {"foreach": True}),
        (optim.NAdam, {"foreach": True}),
        (optim.LBFGS, {}),
    ],
)
def test_auto_on_cuda_picks_fused_then_foreach(cls, want):
    assert implementation_kwargs(cls, CUDA, "auto") == want


def test_explicit_implementations():
    assert implementation_kwargs(optim.RMSprop, "cpu", "foreach") == {"foreach": True}
    assert implementation_kwargs(optim.Adam, CUDA, "foreach") == {"foreach": True}
    assert implementation_kwargs(optim.Adam, "cpu", "fused") == {"fused": True}  # torch >= 2.4 has fused CPU Adam
    with pytest.raises(ConfigError, match=r"implementation=fused: torch\.optim\.RMSprop has no fused") as err:
        implementation_kwargs(optim.RMSprop, CUDA, "fused")
    assert str(err.value).endswith("allowed here: auto, default, foreach")
    with pytest.raises(ConfigError, match="LBFGS has no foreach"):
        implementation_kwargs(optim.LBFGS, CUDA, "foreach")
    with pytest.raises(ConfigError, match=r"^implementation='fastest': must be one of auto, default, foreach, fused$"):
        implementation_kwargs(optim.Adam, CUDA, "fastest")


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_make_optimizer_cpu_implementations_step_like_the_default(implementation):
    """The flags reach torch, and its foreach/fused CPU kernels take the same Adam step."""
    torch.manual_seed(0)
    ref_model = torch.nn.Linear(4, 2)
    model = copy.deepcopy(ref_model)
    factory = functools.partial(torch.optim.Adam, lr=1e-2)
    ref = make_optimizer(factory, ref_model.parameters(), device="cpu", implementation="default")
    opt = make_optimizer(factory, model.parameters(), device="cpu", implementation=implementation)
    assert opt.param_groups[0][implementation] is True and ref.param_groups[0][implementation] in (None, False)
    x = torch.randn(8, 4)
    for m, o in ((ref_model, ref), (model, opt)):
        for _ in range(3):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, ref_model.weight.new_zeros(p.shape))


# ----------------------------------------------------------------------------- config options
OPTIONS = {  # option -> (torch class, g lr, d lr)
    "adam": (optim.Adam, 2e-4, 2e-4),
    "adamw": (optim.AdamW, 2e-4, 2e-4),
    "rmsprop": (optim.RMSprop, 5e-5, 5e-5),
    "sgd": (optim.SGD, 0.01, 0.01),
    "adagrad": (optim.Adagrad, 0.01, 0.01),
    "adadelta": (optim.Adadelta, 1.0, 1.0),
    "adamax": (optim.Adamax, 2e-4, 2e-4),
    "nadam": (optim.NAdam, 2e-4, 2e-4),
    "ttur": (optim.Adam, 1e-4, 4e-4),
}


def build(cfg, net: str, params) -> tuple[torch.optim.Optimizer, dict, dict]:
    """What the entry point does with optim.<net>: instantiate the NetworkOptim and build the network's Update.

    Returns the optimizer, the torch optimizer's hyperparameters from the config (its node plus ``lr``)
    and every other key of ``optim.<net>``; the Update's schedule and clipping must equal those keys.
    """
    update = instantiate(cfg.optim[net]).build(params, "cpu")
    extras = OmegaConf.to_container(cfg.optim[net], resolve=True)
    node = {**extras.pop("optimizer"), "lr": extras.pop("lr")}
    extras.pop("_target_")
    assert update.schedule == instantiate(extras["schedule"])
    assert (update.gradient_clip_val, update.gradient_clip_algorithm) == (
        extras["gradient_clip_val"],
        extras["gradient_clip_algorithm"],
    )
    return update.optimizer, node, extras


def test_every_optim_option_is_tested():
    assert set(OPTIONS) == {p.stem for p in (CONFIG_DIR / "optim").glob("*.yaml")}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_optim_option_composes_and_instantiates(name):
    cls, g_lr, d_lr = OPTIONS[name]
    cfg = compose_config(f"optim={name}")
    assert set(cfg.optim) == {"g", "d"}
    for net, lr in (("g", g_lr), ("d", d_lr)):
        opt, node, extras = build(cfg, net, torch.nn.Linear(3, 2).parameters())
        assert type(opt) is cls and opt.param_groups[0]["lr"] == lr
        for key, value in node.items():  # every YAML hyperparameter reached torch
            if not key.startswith("_"):
                got = opt.param_groups[0][key]
                assert (tuple(got) if isinstance(value, list) else got) == (
                    tuple(value) if isinstance(value, list) else value
                )
        assert extras == {
            "schedule": {
                "_target_": "gantrain.optim.Schedule",
                "kind": "constant",
                "warmup_steps": 0,
                "step_size": 1000,
                "gamma": 0.5,
                "min_lr": 0.0,
            },
            "lookahead": {"_target_": "gantrain.optim.lookahead", "_partial_": True, "k": 0, "alpha": 0.5},
            "gradient_clip_val": None,
            "gradient_clip_algorithm": None,
            "implementation": "auto",
        }
        assert instantiate(extras["schedule"]) == Schedule()


def test_ttur_learning_rates_and_betas():
    cfg = compose_config("optim=ttur")
    d, _, _ = build(cfg, "d", torch.nn.Linear(2, 1).parameters())
    g, _, _ = build(cfg, "g", torch.nn.Linear(2, 1).parameters())
    assert d.param_groups[0]["lr"] == 4e-4 and g.param_groups[0]["lr"] == 1e-4
    assert d.param_groups[0]["betas"] == g.param_groups[0]["betas"] == (0.0, 0.9)


def test_per_network_overrides():
    cfg = compose_config(
        "optim.d.lookahead.k=5",
        "optim.d.schedule.kind=cosine",
        "optim.d.schedule.warmup_steps=10",
        "optim.d.gradient_clip_val=1.0",
        "optim.d.gradient_clip_algorithm=value",
        "optim.d.implementation=foreach",
    )
    d, _, extras = build(cfg, "d", torch.nn.Linear(2, 1).parameters())
    assert isinstance(d, Lookahead) and d.k == 5 and d.alpha == 0.5 and type(d.base) is optim.Adam
    assert d.param_groups[0]["foreach"] is True
    assert instantiate(extras["schedule"]) == Schedule(kind="cosine", warmup_steps=10)
    assert extras["gradient_clip_val"] == 1.0 and extras["gradient_clip_algorithm"] == "value"
    g, _, g_extras = build(cfg, "g", torch.nn.Linear(2, 1).parameters())  # optim.g untouched
    assert (
        type(g) is optim.Adam and g_extras["schedule"]["kind"] == "constant" and g_extras["gradient_clip_val"] is None
    )


@pytest.mark.parametrize("override", ["optim.d.lr_typo=1", "optim.g.schedule.gama=0.1", "optim.g.lookahead.kk=5"])
def test_misspelled_optim_key_fails_on_the_command_line(override):
    with pytest.raises(Exception, match="Could not override"):
        compose_config(override)


@pytest.mark.parametrize(
    "delta", [{"d": {"lr_typo": 1}}, {"g": {"schedule": {"gama": 0.1}}}, {"d": {"lookahead": {"kk": 5}}}]
)
def test_misspelled_optim_key_fails_in_a_yaml_merge(delta):
    """What an experiment file's ``optim:`` block does: merge onto the schema-typed node."""
    cfg = compose_config("optim=sgd")
    with pytest.raises(ConfigKeyError, match="typo|gama|kk"):
        OmegaConf.merge(cfg, {"optim": delta})


def test_bad_schedule_kind_fails_on_instantiate():
    cfg = compose_config("optim.d.schedule.kind=cosinus")
    with pytest.raises(Exception, match="kind='cosinus': must be one of constant"):
        instantiate(cfg.optim.d.schedule)


# ----------------------------------------------------------------------------- SGD update rules
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_option_follows_torchs_documented_update(momentum, nesterov):
    """w0 = 1, loss 0.5 (w x)^2 with x = 1, 2, 3, lr 0.1: torch's SGD rule written out by hand."""
    cfg = compose_config(
        "optim=sgd",
        "optim.d.lr=0.1",
        f"optim.d.optimizer.momentum={momentum}",
        f"optim.d.optimizer.nesterov={str(nesterov).lower()}",
    )
    w = scalar_param()
    opt, _, _ = build(cfg, "d", [w])
    hand, buf = 1.0, None
    for x in (1.0, 2.0, 3.0):
        opt.zero_grad()
        (0.5 * (w * x) ** 2).sum().backward()
        opt.step()
        grad = hand * x**2
        if momentum:
            buf = grad if buf is None else momentum * buf + grad  # dampening 0
            direction = grad + momentum * buf if nesterov else buf
        else:
            direction = grad
        hand -= 0.1 * direction
        assert math.isclose(w.item(), hand, rel_tol=1e-12), (x, w.item(), hand)
    assert hand != 1.0
