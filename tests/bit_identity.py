"""What "nothing a user sees changes" means for a refactor, as numbers: short fixed-seed runs of every recipe
whose final checkpoints are reduced to per-tensor hashes (:func:`fingerprint`) and compared with hashes recorded
once from the code before the change (``tests/fixtures/bit_identity.json``, written by
``python -m tests.bit_identity --write``; a recipe added later: ``--add``, which records it alone).

A fingerprint covers what decides every later step: the step counters, the weights, every optimizer's,
scheduler's and loss scaler's state, the EMA, the data stream's position, every RNG and the last logged
values. Tensors are hashed by dtype, shape and raw bytes, so equal means bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.conftest import EXPERIMENTS, REPO, TINY, TINY_WIDTH, make_cfg

FIXTURES = REPO / "tests" / "fixtures"
HASHES = FIXTURES / "bit_identity.json"
OLD_CHECKPOINT = FIXTURES / "dcgan_ema_step10.ckpt"  # written by the code before the structure change
STEPS = 20
# What a checkpoint holds that decides the rest of the run (not the config, settings or format tag).
DECIDING = (
    "step",
    "iteration",
    "images_seen",
    "model",
    "optimizers",
    "schedulers",
    "scalers",
    "ema",
    "rng",
    "data",
    "metrics",
    "best",
    "world_size",
)


def recipe_overrides(experiment: str) -> list[str]:
    """A recipe at seed 0 for STEPS steps, no periodic checkpoint or grid (they change no state)."""
    return [
        f"+experiment={experiment}",
        "seed=0",
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_every_n_steps=1000",
        "trainer.sample_every_n_steps=1000",
    ]


RESUMED = [
    "+experiment=dcgan",
    "seed=0",
    "trainer.ema.half_life_images=100",
    "trainer.checkpoint_every_n_steps=1000",
    "trainer.sample_every_n_steps=1000",
]  # BatchNorm, an EMA generator: the old-checkpoint fixture's run too
RESUMED_WGAN_GP = [
    "+experiment=wgan_gp",
    "seed=0",
    "trainer.checkpoint_every_n_steps=1000",
    "trainer.sample_every_n_steps=1000",
    "trainer.accumulate_grad_batches=2",
]
TORCHRUN = [
    "+experiment=dcgan",
    *TINY,
    *TINY_WIDTH["ngf"],
    "seed=0",
    "trainer.ema.half_life_images=100",
    "trainer.checkpoint_every_n_steps=1000",
    "trainer.sample_every_n_steps=1000",
    "trainer.max_steps=4",
]


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(raw).hexdigest()[:24]


def _flatten(obj: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = _digest(obj)
    elif isinstance(obj, np.ndarray):
        out[prefix] = f"np{obj.dtype}{obj.shape}:" + hashlib.sha256(obj.tobytes()).hexdigest()[:24]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = repr(obj)


def fingerprint(ckpt: dict) -> dict[str, str]:
    """Every deciding value of a checkpoint, flattened to ``key -> dtype, shape and hash`` (tensors) or repr."""
    out: dict[str, str] = {}
    for key in DECIDING:
        _flatten(ckpt.get(key), key, out)
    return out


def read(run_dir: Path) -> dict[str, str]:
    return fingerprint(torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False))


def train_in_process(run_dir: Path, *overrides: str) -> dict[str, str]:
    from gantrain.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count can change a CPU kernel's summation order
    try:
        train(make_cfg(*overrides), run_dir)
    finally:
        torch.set_num_threads(threads)
    return read(run_dir)


def recipe(tmp: Path, experiment: str) -> dict[str, str]:
    return train_in_process(tmp / experiment, *recipe_overrides(experiment))


def resumed(tmp: Path, overrides: list[str], name: str) -> dict[str, str]:
    run = tmp / name
    train_in_process(run, *overrides, f"trainer.max_steps={STEPS // 2}")
    return train_in_process(run, *overrides, f"trainer.max_steps={STEPS}", "trainer.resume=auto")


def torchrun(tmp: Path) -> dict[str, str]:
    import os

    run = tmp / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gantrain",
        *TORCHRUN,
        f"hydra.run.dir={run}",
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return read(run)


def record(tmp: Path) -> dict:
    """Every fingerprint, and the old-checkpoint fixture (step 10 of the RESUMED run)."""
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"torch": torch.__version__, "recipes": {}}
    for experiment in EXPERIMENTS:
        result["recipes"][experiment] = recipe(tmp, experiment)
        print("recorded", experiment, flush=True)
    half = tmp / "half"
    train_in_process(half, *RESUMED, f"trainer.max_steps={STEPS // 2}")
    shutil.copyfile(half / "checkpoints" / "last.ckpt", OLD_CHECKPOINT)
    result["resumed_dcgan"] = resumed(tmp, RESUMED, "resumed_dcgan")
    result["straight_dcgan"] = train_in_process(tmp / "straight", *RESUMED, f"trainer.max_steps={STEPS}")
    result["resumed_wgan_gp"] = resumed(tmp, RESUMED_WGAN_GP, "resumed_wgan_gp")
    result["torchrun"] = torchrun(tmp)
    return result


if __name__ == "__main__":
    import tempfile

    if "--add" in sys.argv:  # a new recipe: record it, keep every fingerprint (and the old checkpoint) as they are
        saved = json.loads(HASHES.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            for experiment in sorted(set(EXPERIMENTS) - set(saved["recipes"])):
                saved["recipes"][experiment] = recipe(Path(tmp), experiment)
                print("recorded", experiment, flush=True)
        HASHES.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        sys.exit(0)
    if "--write" not in sys.argv:
        sys.exit(
            "usage: python -m tests.bit_identity --write  (records tests/fixtures/ from the code as it is)\n"
            "       python -m tests.bit_identity --add    (records only the recipes not recorded yet)"
        )
    FIXTURES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        HASHES.write_text(json.dumps(record(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print("wrote", HASHES, OLD_CHECKPOINT)
