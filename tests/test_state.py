"""The structure's contracts: one registry of saved state (a user's stateful loss term resumes through it without an
edit to gantrain), one cadence, no probes between parts, no import circles."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gantrain.cadence import Cadence
from gantrain.errors import CheckpointError
from gantrain.settings import TrainerSettings
from gantrain.state import Each, Mismatch, Model, Optimizers, TrainingState
from tests.conftest import REPO, TINY, TINY_WIDTH

PACKAGE = REPO / "gantrain"

# ----------------------------------------------------------------------------- a user's stateful loss term
COUNTING_LOSS = '''
import os
import signal

from gantrain.losses import BCELoss
from gantrain.state import Stateful


class CountingBCE(BCELoss, Stateful):
    """The non-saturating loss, counting the D losses it computed; sends itself SIGTERM at call STOP_AT."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def d_loss(self, real, fake):
        self.calls += 1
        if self.calls == int(os.environ.get("STOP_AT", "0")):
            os.kill(os.getpid(), signal.SIGTERM)  # handled after this step: the run saves and exits 143
        return super().d_loss(real, fake)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]
'''


def test_a_users_stateful_loss_term_survives_sigterm_and_resume(tmp_path):
    """A term from outside the repository (hydra.searchpath) that subclasses Stateful is saved under its config key
    and continues after SIGTERM + resume: its count equals the uninterrupted run's, and so do the weights."""
    (tmp_path / "mygan").mkdir()
    (tmp_path / "mygan" / "__init__.py").write_text("")
    (tmp_path / "mygan" / "counting.py").write_text(COUNTING_LOSS)
    (tmp_path / "myconf" / "loss").mkdir(parents=True)
    (tmp_path / "myconf" / "loss" / "counting.yaml").write_text(
        "_target_: gantrain.objectives.GANObjective\nadversarial:\n  _target_: mygan.counting.CountingBCE\n"
    )
    args = [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "loss=counting", *TINY, *TINY_WIDTH["ngf"]]
    args += ["trainer.max_steps=8", "trainer.checkpoint_every_n_steps=1000", "trainer.sample_every_n_steps=1000"]

    def gantrain(run: Path, *more: str, stop_at: int = 0) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "STOP_AT": str(stop_at)}
        cmd = [sys.executable, "-m", "gantrain", *args, f"hydra.run.dir={run}", *more]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    straight = gantrain(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = gantrain(tmp_path / "run", stop_at=3)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    load = lambda run: torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # noqa: E731
    assert load(tmp_path / "run")["step"] == 3 and load(tmp_path / "run")["loss.adversarial"] == {"calls": 3}
    resumed = gantrain(tmp_path / "run", "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load(tmp_path / "straight"), load(tmp_path / "run")
    assert a["loss.adversarial"] == b["loss.adversarial"] == {"calls": 8}  # one D loss per step, none lost
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


# ----------------------------------------------------------------------------- the registry and the cadence
def test_the_registry_restores_in_order_and_names_what_does_not_fit(caplog):
    net, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    counts = {"a": SimpleNamespace(n=1), "b": SimpleNamespace(n=2)}
    for c in counts.values():
        c.state_dict = lambda c=c: {"n": c.n}
        c.load_state_dict = lambda s, c=c: setattr(c, "n", s["n"])
    state = TrainingState()
    state.register("model", Model(net))
    state.register("counts", Each(counts))
    saved = state.state_dict()
    assert saved["counts"] == {"a": {"n": 1}, "b": {"n": 2}}
    counts["a"].n, counts["b"].n = 10, 20
    with torch.no_grad():
        net.weight.add_(1.0)
    del saved["counts"]["b"]  # a part the checkpoint lacks keeps its fresh state
    state.load_state_dict(saved, "checkpoint 'x'")
    assert (counts["a"].n, counts["b"].n) == (1, 20) and torch.equal(net.weight, saved["model"]["weight"])
    state.register("new", Each({}))
    caplog.set_level("INFO")
    state.load_state_dict(saved, "checkpoint 'x'")
    assert "trainer.resume: checkpoint 'x' has no state for new; it starts afresh" in caplog.text
    wrong = TrainingState()
    wrong.register("model", Model(other))
    with pytest.raises(CheckpointError, match=r"^trainer.resume: checkpoint 'x' does not fit this model: "):
        wrong.load_state_dict(saved, "checkpoint 'x'")
    phases = [SimpleNamespace(name="D", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))]
    with pytest.raises(Mismatch, match=r"^has no optimizer state for phases \['D'\]$"):
        Optimizers(phases).load_state_dict({})


def test_the_cadence_says_which_phases_run_and_when_callbacks_write():
    settings = TrainerSettings(
        n_critic=3, accumulate_grad_batches=2, log_every_n_steps=4, sample_every_n_steps=6, checkpoint_every_n_steps=9,
        eval_every_n_steps=5,
    )  # fmt: skip
    phases = [SimpleNamespace(name="D", interval=1, counts_as_step=False), SimpleNamespace(name="G", interval=3,
              counts_as_step=True)]  # fmt: skip
    c = Cadence.of(settings, phases)
    assert [c.due(i) for i in range(6)] == [["D"], ["D"], ["D", "G"], ["D"], ["D"], ["D", "G"]]
    assert c.batches_of_next_step(0) == (3 + 1) * 2 and c.batches_of_next_step(2) == 2 * 2
    assert [s for s in range(1, 21) if c.logs(s)] == [4, 8, 12, 16, 20]
    assert [s for s in range(1, 21) if c.evaluates(s)] == [5, 10, 15, 20]
    assert [s for s in range(1, 21) if c.writes(s)] == [4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20]
    assert not any(Cadence.of(TrainerSettings(), phases).evaluates(s) for s in range(1, 100))  # 0: only at the end


# ----------------------------------------------------------------------------- no probes, no circles
PROBES = [
    (r"\bhasattr\(", "a hasattr probe"),
    (r"getattr\(trainer\b", "a getattr probe of the trainer"),
    (r"isinstance\(\w+, (Callback|Checkpointing|RunLog|Evaluation|ReadAhead|RankSync|RankBarriers)\)", "a lookup"),
    (r"callbacks\[\d+\]", "a callback found by its position"),
    (r"\binspect\.signature\(data", "a probe of a data option's signature"),
]


def test_no_part_probes_another():
    found = [
        f"{path.relative_to(REPO)}:{n}: {what}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        for pattern, what in PROBES
        if re.search(pattern, line)
    ]
    assert not found, "\n".join(found)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def module_imports(path: Path) -> set[str]:
    """The gantrain modules ``path`` imports when it is imported (module level, outside ``if TYPE_CHECKING``),
    with the packages a submodule import runs first."""
    name = module_name(path)
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + [h for t in getattr(node, "handlers", []) for h in t.body])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gantrain"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gantrain"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # a submodule, if it is one

    visit(tree.body)
    modules = {module_name(m) for m in PACKAGE.rglob("*.py")}
    closed = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 2)}
    return {m for m in closed if m in modules and m != name and not name.startswith(m + ".")}


def test_the_import_graph_has_no_circles():
    graph = {module_name(p): module_imports(p) for p in PACKAGE.rglob("*.py")}
    assert graph["gantrain.trainer"] >= {"gantrain.settings", "gantrain.state"}  # the walk sees imports
    assert graph["gantrain.settings"] <= {"gantrain.checks", "gantrain.errors"}  # a leaf
    done, circles = set(), []

    def walk(node, path):
        if node in path:
            circles.append(" -> ".join(path[path.index(node) :] + [node]))
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            walk(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        walk(node, [])
    assert not circles, "\n".join(circles)
