"""One clear line for every user mistake, run as a user runs it: ``python -m gantrain ...`` and the scripts.

``MISTAKES`` is the table: each row a command and a regex that one line of its output must match
(the key or path, what was wrong). Every row must exit non-zero without a traceback. Adding a
mistake is one row; ``{name}`` in a row is a path from the ``paths`` fixture (add one there if a
new row needs a file of its own). The rest of the file tests the behaviour behind some rows:
sampling in batches, outputs that are never overwritten, ``evaluate.py --data`` values, and a
corrupt image found mid-training.
"""

from __future__ import annotations

import errno
import fnmatch
import importlib.util
import logging
import os
import re
import resource
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from gantrain import checkpoint as ckpt_io
from gantrain import pictures, sampling
from gantrain.data import BatchStream, DataError, ImageFolder
from gantrain.errors import GantrainError
from gantrain.sampling import generate, load_model
from gantrain.train import train
from tests.conftest import REPO, TINY, make_cfg

CUDA = torch.cuda.is_available()
NGF = "model.g.ngf=8 model.d.ndf=8"
CORRUPT = "005.png"  # the file of the `corrupt` folder whose pixel data cannot be decoded


def case(command: str, message: str, *marks: pytest.MarkDecorator):
    """A row: ``command`` (``sample.py ...``/``evaluate.py ...`` run that script; anything else is
    ``python -m gantrain`` with the TINY overrides) and the regex one output line must match."""
    return pytest.param(command, message, marks=marks, id=command[:70])


no_cuda = pytest.mark.skipif(CUDA, reason="CUDA is available here, so the device is no mistake")
slow = pytest.mark.slow  # ~5 s each: the default run keeps the issue's cases and one or two of each kind
MISTAKES = [
    # The issue's cases.
    case("optim.d.lr=-1", r"optim\.d\.lr=-1\.0: must be > 0$"),
    case("optim.g.optimizer.betas=[0.5]", r"optim\.g\.optimizer\.betas=\[0\.5\]: must be two numbers \[beta1, beta2\]"),
    case(
        "optim.g.betas=[0.5]",
        r"^gantrain: error: optim\.g\.betas: no such key; did you mean optim\.g\.optimizer\.betas\?",
    ),
    case("model.g.nz=0", r"model\.g\.nz=0: must be an integer >= 1$"),
    case("data=folder", r"data\.path: has no value and no default; set it"),
    case("model=mlp", r"data\.resolution: .*'\$\{model\.resolution\}'.* \(the model and data options do not fit"),
    case("+experiment=vae loss=bce", r"loss: GANObjective trains \['g', 'd'\] but the model has no \['d'\]"),
    case(
        f"data=folder data.path={{corrupt}} data.channels=1 data.batch_size=4 trainer.max_steps=8 {NGF}",
        rf"data\.path: cannot decode '{CORRUPT}' under '{{corrupt}}' \(\w+: .*\); replace or remove the file, "
        r"or set data\.skip_corrupt=true .*; the run stopped after step \d, saved in .*trainer\.resume=auto$",
    ),
    case(
        "evaluate.py --checkpoint {vae} --data foo=1", r"--data foo: not a key of the run's data config .* batch_size"
    ),
    case("sample.py --checkpoint {gan} --num 2 --out {existing_pt}", r"--out: '{existing_pt}' exists; pass --force"),
    case("sample.py --checkpoint {gan} --num 2 --out {gan} --force", r"--out: '{gan}' is the input --checkpoint"),
    # The command line: keys, options, types.
    case("seeed=1", r"^gantrain: error: seeed: no such key; did you mean seed\? \(the top level has: seed, "),
    case("trainer.max_step=3", r"trainer\.max_step: no such key; did you mean trainer\.max_steps\?"),
    case("model.g.init=normal", r"model\.g\.init: no such key; did you mean model\.init\?", slow),
    case("optim.d.optimizer.lr=0.1", r"optim\.d\.optimizer\.lr: no such key; did you mean optim\.d\.lr\?", slow),
    case("optim.d.optimizer.momentum=0.9", r"optim\.d\.optimizer\.momentum: no such key \(optim\.d\.optimizer \(torch"),
    case("+experiment=nope", r"^gantrain: error: experiment=nope: must be one of acgan, cgan_pd, cvae, .*wgan_gp"),
    case("model=nope", r"model=nope: must be one of dcgan, mlp, resnet", slow),
    case("trainer.max_steps=abc", r"trainer\.max_steps='abc': must be an integer$"),
    case("data.batch_size=1.5", r"data\.batch_size=1\.5: must be an integer$", slow),
    case("seed=abc", r"seed='abc': must be an integer$", slow),
    case("trainer.max_steps=[1,", r"trainer\.max_steps=\[1,: not a valid override \(no viable alternative", slow),
    # Values out of range, choices, combinations.
    case("trainer.precision=fp16", r"trainer\.precision='fp16': must be one of 32, bf16-mixed, 16-mixed$"),
    case("trainer.device=cuda", r"trainer\.device='cuda' but CUDA is not available here", no_cuda),
    case("trainer.n_critic=0", r"trainer\.n_critic=0: must be an integer >= 1$"),
    case("trainer.gradient_clip_val=-1", r"trainer\.gradient_clip_val=-1\.0: must be > 0", slow),
    case("+experiment=wgan_gp loss.gp.weight=-1", r"loss\.gp\.weight=-1\.0: must be >= 0", slow),
    case(
        "optim.g.schedule.kind=cosin", r"optim\.g\.schedule\.kind='cosin': must be one of constant, step, cosine", slow
    ),
    case(
        "optim.g.optimizer.betas=[0.5,2]", r"optim\.g\.optimizer: torch\.optim\.Adam refuses .*Invalid beta param", slow
    ),
    case("model.g.ngf=0", r"model\.g\.ngf=0: must be an integer >= 1$", slow),
    case(
        "trainer.ema=10000",
        r"trainer\.ema=10000: must be a node of EMA settings \(e\.g\. trainer\.ema\.half_life",
        slow,
    ),
    case("optim=sgd optim.d.optimizer.momentum=-1", r"optim\.d\.optimizer: torch\.optim\.SGD refuses .*momentum", slow),
    case("optim.g.optimizer.amsgrad=maybe", r"optim\.g\.optimizer\.amsgrad='maybe': must be true or false$", slow),
    case("data.resolution=16", r"data\.resolution=16 but model\.resolution=32"),
    case(
        "data=ring8",
        r"model\.g\.channels: Interpolation key 'data\.channels' not found \(the model and data options do not fit",
        slow,
    ),
    case("data.holdout=100000", r"data\.holdout=100000: must be at most 1789", slow),
    # Paths and checkpoints.
    case("trainer.resume=/no/such.ckpt", r"trainer\.resume: checkpoint '/no/such\.ckpt' does not exist$", slow),
    case("trainer.resume={not_ckpt}", r"trainer\.resume: '{not_ckpt}' is not a readable checkpoint", slow),
    case("data=folder data.path=/no/such/dir", r"data\.path '/no/such/dir' does not exist", slow),
    case("data=folder data.path={not_ckpt}", r"data\.path '{not_ckpt}' is a file, not a directory", slow),
    case("data=folder data.path={empty}", r"no images \(.*\) under data\.path '{empty}'$"),
    case(
        "hydra.run.dir={readonly}",
        r"cannot write '{readonly}/\.lock': (Permission denied|Operation not permitted|Read-only file system); "
        r"the run directory must be writable",
    ),
    case(
        "ulimit -f 300 ; hydra.run.dir={tmp}/full",  # files may not grow past 300 KiB: writes fail as on a full disk
        r"cannot write '{tmp}/full/checkpoints/last\.ckpt': File too large \(needs [\d.]+ MiB, .* free on its file "
        r"system\); free some space",
    ),
    case("hydra.run.dir=/proc/gantrain/run", r"hydra\.run\.dir=/proc/gantrain/run: cannot create this directory", slow),
    # The scripts.
    case("sample.py --checkpoint /no/such.ckpt --num 2 --out {tmp}/x.pt", r"--checkpoint: checkpoint '/no/such\.ckpt'"),
    case(
        "sample.py --checkpoint {not_ckpt} --num 2 --out {tmp}/x.pt",
        r"--checkpoint: '{not_ckpt}' is not a readable",
        slow,
    ),
    case("sample.py --checkpoint {gan} --num 2 --batch-size 0 --out {tmp}/x.pt", r"--batch-size=0: must be >= 1$"),
    case(
        "sample.py --checkpoint {gan} --num 2 --device cuda --out {tmp}/x.pt",
        r"--device='cuda' but CUDA",
        no_cuda,
        slow,
    ),
    case("sample.py --checkpoint {gan} --num 100000000 --out {tmp}/g.png", r"a grid of 100000000 samples would have"),
    case(
        "sample.py --checkpoint {gan} --num 1000000000 --out {tmp}/x.pt",
        r"samples of shape \(1, 32, 32\) are 4096",
        slow,
    ),
    # evaluate.py on a GAN checkpoint (FID/KID/PR; issue 12)
    case(
        "evaluate.py --checkpoint /no/such.ckpt",
        r"^evaluate\.py: error: --checkpoint: checkpoint '/no/such\.ckpt' does",
    ),
    case("evaluate.py --checkpoint {gan} --num 0", r"^evaluate\.py: error: --num=0: must be >= 2"),
    case(
        "evaluate.py --checkpoint {gan} --reference {empty} --metrics extractor={_target_:tests.extractors.Tiny"
        "Features}",
        r"^evaluate\.py: error: no images \(.*\) under --reference '{empty}'$",
    ),
    case(
        "evaluate.py --checkpoint {gan} --reference /no/such/dir", r"--reference '/no/such/dir': must be an existing fo"
    ),
    case(
        "evaluate.py --checkpoint {gan} --metrics which=[is] extractor={_target_:tests.extractors.TinyFeatures}",
        r"--metrics which='is': must be one of fid, kid, pr",
        slow,
    ),
    case(
        "evaluate.py --checkpoint {vae} --data batch_size=abc",
        r"--data batch_size='abc': must be an integer >= 1$",
        slow,
    ),
    case(
        "evaluate.py --checkpoint {vae} --data holdout=0", r"--data holdout=0: must be >= 1 for held-out images", slow
    ),
]


def png_with_corrupt_pixels(path: Path) -> None:
    """Rewrite the PNG at ``path`` with its zlib stream cut short but every chunk CRC right: PIL's
    ``verify()`` passes, decoding the pixels fails."""
    data, out, i = path.read_bytes(), bytearray(path.read_bytes()[:8]), 8
    while i < len(data):
        (n,), kind = struct.unpack(">I", data[i : i + 4]), data[i + 4 : i + 8]
        body = data[i + 8 : i + 8 + n]
        if kind == b"IDAT":
            body = body[: len(body) // 3]
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        i += 12 + n
    path.write_bytes(bytes(out))


def image_folder(root: Path, n: int, corrupt: str | None = None) -> Path:
    """``n`` random 16x16 grey PNGs ``000.png`` ...; ``corrupt`` (a name) gets undecodable pixel data."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / f"{i:03d}.png")
    if corrupt is not None:
        png_with_corrupt_pixels(root / corrupt)
    return root


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """A directory no run may write to: mode 555, or for root (whom modes do not stop) immutable via
    ``chattr +i``; where neither works, sysfs's /sys/kernel (no new files there, even for root)."""
    folder = tmp_path_factory.mktemp("readonly")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        yield Path("/sys/kernel")


@pytest.fixture(scope="module")
def paths(tmp_path_factory, readonly) -> dict[str, str]:
    """What the rows name: checkpoints of a tiny GAN and VAE, a file that is no checkpoint, an existing
    sample file, an empty folder and a folder with one corrupt image."""
    root = tmp_path_factory.mktemp("mistakes")
    train(make_cfg(), root / "gan")
    train(make_cfg("+experiment=vae_mlp", "data.holdout=16"), root / "vae")
    (root / "not.ckpt").write_text("not a checkpoint")
    torch.save(torch.zeros(2), root / "existing.pt")
    (root / "empty").mkdir()
    image_folder(root / "corrupt", 20, corrupt=CORRUPT)
    (root / "userconf" / "optim").mkdir(parents=True)
    (root / "userconf" / "optim" / "mysgd.yaml").write_text(USER_OPTIM)
    return {
        "userconf": str(root / "userconf"),
        "gan": str(root / "gan" / "checkpoints" / "last.ckpt"),
        "vae": str(root / "vae" / "checkpoints" / "last.ckpt"),
        "not_ckpt": str(root / "not.ckpt"),
        "existing_pt": str(root / "existing.pt"),
        "empty": str(root / "empty"),
        "corrupt": str(root / "corrupt"),
        "readonly": str(readonly),
    }


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` as a user types it (see :func:`case`), with this checkout's gantrain, in a run
    directory of its own unless the row sets ``hydra.run.dir``."""
    words = shlex.split(command)
    limit = None
    if words[:2] == ["ulimit", "-f"]:  # as bash's `ulimit -f KIB; ...`: the largest file the run may write
        limit, words = int(words[2]) * 1024, words[4:]
    if words[0].endswith(".py"):
        argv = [sys.executable, str(REPO / "scripts" / words[0]), *words[1:]]
    else:
        own_dir = any(w.startswith("hydra.run.dir=") for w in words)  # else a fresh one per row
        multirun = ["-m"] * ("-m" in words)  # Hydra takes the flag before the overrides
        words = [w for w in words if w != "-m"]
        run_dir = [] if own_dir else [f"hydra.run.dir={cwd / 'run'}"]
        argv = [sys.executable, "-m", "gantrain", *multirun, *TINY, *words, *run_dir]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if limit is not None:  # torch's compile cache would look for its folder by writing into the temp folder
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cwd.parent / "inductor-cache")
    preexec = None if limit is None else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def filled(text: str, paths: dict[str, str], escape: bool) -> str:
    for name, value in paths.items():
        text = text.replace(f"{{{name}}}", re.escape(value) if escape else value)
    return text


@pytest.mark.parametrize(("command", "message"), MISTAKES)
def test_a_mistake_is_one_line_naming_it(paths, tmp_path, command, message):
    where = {**paths, "tmp": str(tmp_path)}
    r = run(filled(command, where, escape=False), tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    pattern = re.compile(filled(message, where, escape=True))
    assert any(pattern.search(line) for line in out.splitlines()), out[-3000:]


def test_the_table_holds_every_case_of_the_issue():
    """Acceptance: at least 30 mistakes, the issue's own cases among them."""
    commands = [p.values[0] for p in MISTAKES]
    assert len(commands) >= 30
    for named in (
        "optim.d.lr=-1",
        "optim.g.optimizer.betas=[0.5]",
        "optim.g.betas=[0.5]",
        "model.g.nz=0",
        "data=folder",
        "model=mlp",
        "+experiment=vae loss=bce",
        "evaluate.py --checkpoint {vae} --data foo=1",
        "sample.py --checkpoint {gan} --num 2 --out {existing_pt}",
        "sample.py --checkpoint {gan} --num 2 --out {gan} --force",
        "hydra.run.dir={readonly}",
        "ulimit -f 300 ; hydra.run.dir={tmp}/full",
    ):
        assert named in commands, named
    assert any("data.path={corrupt}" in c for c in commands)


# ----------------------------------------------------------------------------- refused before training (issue 26)
# A user's own optimizer node, outside the repository and without a schema (hydra.searchpath=[file://{userconf}]).
USER_OPTIM = """\
g:
  _target_: gantrain.optim.NetworkOptim
  lr: 0.01
  optimizer: {_target_: torch.optim.SGD, _partial_: true, momentum: 0.9}
d:
  _target_: gantrain.optim.NetworkOptim
  lr: 0.01
  optimizer: {_target_: torch.optim.SGD, _partial_: true, momentun: 0.9}
"""
FID = "metrics=fid metrics/extractor=tiny hydra.searchpath=[file://" + str(REPO / "tests" / "configs") + "]"
joblib = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None, reason="hydra-joblib-launcher"
)


def refusal(command: str, message: str, setup: str = "", *marks: pytest.MarkDecorator):
    """A row of REFUSED: ``setup`` names what :func:`prepare` puts in the test's folder first."""
    return pytest.param(command, message, setup, marks=marks, id=command[:70])


REFUSED = [
    refusal(
        f"{FID} metrics.cache_dir={{tmp}}/cache trainer.monitor=metrics/fdi",
        r"^\[.*\]\[ERROR\] - trainer\.monitor='metrics/fdi': must be one of metrics/fid, metrics/kid, "
        r"metrics/precision, metrics/recall \(what this run evaluates\), or a training stat such as loss/G$",
    ),
    refusal(
        "trainer.monitor=toy/hq",
        r"trainer\.monitor='toy/hq': must be a training stat such as loss/G \(this run evaluates nothing; "
        r"metrics=fid evaluates metrics/fid, .*, a VAE with data\.holdout > 0 metrics/elbo\)$",
    ),
    refusal("model.resolution=8192", r"model\.g\.resolution=8192: must be a power of two from 8 to 256 \(32 and 64"),
    refusal(
        "+experiment=vae_mlp model.resolution=8192",
        r"model\.g\.encoder\.resolution=8192: must be an integer >= 4 and <= 128$",
    ),
    refusal(
        "trainer.resume=auto",
        r"'{tmp}/run/checkpoints/last\.ckpt' is a folder; gantrain writes its checkpoint file there; move it away",
        "last.ckpt is a folder",
    ),
    refusal(
        "hydra.searchpath=[file://{userconf}] optim=mysgd",
        r"^\[.*\]\[ERROR\] - optim\.d\.optimizer\.momentun: not an argument of torch\.optim\.SGD; it takes: params, "
        r"lr, momentum, dampening, weight_decay, nesterov",
    ),
    refusal(
        "ulimit -f 0 ; hydra.run.dir={tmp}/full/run",  # as on a full disk, not one byte more goes in
        r"cannot write '{tmp}/full/run/\.lock': File too large \(.* free on its file system\); free some space",
    ),
    refusal(
        f"ulimit -f {{kib}} ; trainer.resume=auto trainer.max_steps=4 {NGF}",  # the configs fit, TensorBoard's run not
        r"cannot write '{tmp}/run/(events\.out\.tfevents\.[^']+|config\.yaml|\.hydra/\w+\.yaml)': File too large",
        "a finished run",
    ),
    refusal(
        "-m hydra/launcher=parallel hydra.launcher.n_jobs=0 seed=0,1 hydra.sweep.dir={tmp}/sweep",
        r"^gantrain: error: hydra\.launcher\.n_jobs=0: must be an integer >= 1 \(the jobs run at once\) or < 0",
        "",
        joblib,
    ),
    refusal(
        "data.batch_size=${nope.key}", r"^\[.*\]\[ERROR\] - data\.batch_size: Interpolation key 'nope\.key' not found$"
    ),
    refusal(  # the default run directory's name holds the overrides, so that is where it fails first
        "data.batch_size=${nope.key} hydra.run.dir={tmp}/outputs/${hydra.job.override_dirname}",
        r"^gantrain: error: data\.batch_size: Interpolation key 'nope\.key' not found$",
    ),
]


def prepare(setup: str, tmp: Path, paths: dict[str, str]) -> dict[str, str]:
    """What a REFUSED row needs in ``tmp`` before it runs; returns more names for its command."""
    if setup == "last.ckpt is a folder":
        (tmp / "run" / "checkpoints" / "last.ckpt").mkdir(parents=True)
        (tmp / "run" / "checkpoints" / "last.ckpt" / "mine.txt").write_text("the user's")
    if setup == "a finished run":  # resumable (the GAN of `paths`); the limit holds its config files, not TensorBoard's
        shutil.copytree(Path(paths["gan"]).parents[1], tmp / "run")
        return {"kib": str((tmp / "run" / "config.yaml").stat().st_size // 1024 + 2)}
    return {}


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under ``folder``."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("command", "message", "setup"), REFUSED)
def test_a_refused_run_is_one_line_and_leaves_nothing_behind(paths, tmp_path, command, message, setup):
    """Refused before training (or, on a full disk, before its first step): exit 1, one error line naming the key,
    no traceback, and the folder as it was: no new directory, no empty file, no file changed but train.log."""
    where = {**paths, "tmp": str(tmp_path), **prepare(setup, tmp_path, paths)}
    before = _tree(tmp_path)
    r = run(filled(command, where, escape=False), tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "[ERROR]" in line or line.startswith("gantrain: error:")]
    assert len(errors) == 1 and re.search(filled(message, where, escape=True), errors[0]), out[-3000:]
    after = _tree(tmp_path)
    # a resume that passed its checks has recorded its config (as any resume does) and appended to train.log
    written = ("run/train.log", "run/.lock", "run/config.yaml", "run/.hydra*") if setup == "a finished run" else ()
    new = [k for k in after.keys() ^ before.keys() if not any(fnmatch.fnmatch(k, w) for w in written)]
    changed = [k for k in after.keys() & before.keys() if after[k] != before[k] and k not in written]
    assert new == [] and changed == [] and not [k for k, v in after.items() if v == b""], (new, changed)


@pytest.mark.parametrize("fitting", [0, 1], ids=["no-record-fits", "the-first-record-fits"])
def test_a_full_disk_under_tensorboard_is_one_line_and_removes_the_events_file_it_began(tmp_path, monkeypatch, fitting):
    """TensorBoard writes its file's first record at once and the rest from its own thread; on a full disk (simulated
    in its file layer, as test_long_runs simulates one under torch.save) the file is created and ``fitting`` records go
    in. One line naming the file, which is removed; an earlier run's events file stays."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    from gantrain.files import WriteError
    from gantrain.runlog import RunLog

    real, records = gfile.LocalFileSystem._write, []

    def full(self, filename, content, mode):
        records.append(content)
        if len(records) <= fitting:
            return real(self, filename, content, mode)
        open(filename, "ab").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gfile.LocalFileSystem, "_write", full)
    (tmp_path / "events.out.tfevents.1.earlier.0").write_bytes(b"an earlier run's")
    log = RunLog(tmp_path, config={"seed": 0}, metric_tags=["loss/G"])
    with pytest.raises(WriteError) as e:
        log.open_writer(0)
    folder = re.escape(str(tmp_path))
    assert re.fullmatch(
        rf"cannot write '{folder}/events\.out\.tfevents\.\d+\.[^']+': No space left on device \(.* free on its "
        r"file system\); free some space .*trainer\.resume=auto",
        str(e.value),
    ), str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["events.out.tfevents.1.earlier.0"] and log.writer is None
    assert len(records) == fitting + 1  # the records that fitted, and the one that did not


# ----------------------------------------------------------------------------- sampling in batches
def _script(name: str):
    """scripts/<name> as a module, to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_noise_is_drawn_per_block_and_the_batch_size_changes_no_sample(paths, monkeypatch):
    """Any --num: latents come in NOISE_BLOCK pieces as decoding needs them, never all at once; one
    generator advanced block by block, so every batch size gives the same samples."""
    model = load_model(paths["gan"])
    monkeypatch.setattr(sampling, "NOISE_BLOCK", 4)
    drawn, decoded = [], []
    noise, sample = model.noise, model.sample
    monkeypatch.setattr(model, "noise", lambda n, *a, **k: drawn.append(n) or noise(n, *a, **k))
    monkeypatch.setattr(model, "sample", lambda z: decoded.append(len(z)) or sample(z))
    ref = generate(model, 10, seed=3, batch_size=3, progress=False)
    assert drawn == [4, 4, 2] and decoded == [3, 3, 3, 1]
    for batch_size in (1, 5, 256):
        torch.testing.assert_close(generate(model, 10, seed=3, batch_size=batch_size), ref, rtol=0, atol=1e-6)
    z = torch.Generator().manual_seed(3)  # the same generator, advanced block by block
    blocks = torch.cat([noise(4, generator=z), noise(4, generator=z), noise(2, generator=z)])
    torch.testing.assert_close(ref, sample(blocks), rtol=0, atol=1e-6)
    assert not torch.allclose(generate(model, 10, seed=4, batch_size=3), ref)


def test_sample_script_writes_a_folder_batch_by_batch(paths, tmp_path, monkeypatch):
    """A folder output is written as batches arrive: the first PNGs exist before the last batch is drawn."""
    model = load_model(paths["gan"])
    seen: list[int] = []
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda z: seen.append(len(list(tmp_path.glob("out/*.png")))) or sample(z))
    written = sampling.sample_to(model, tmp_path / "out", 10, seed=1, batch_size=4, progress=False)
    assert seen == [0, 4, 8]  # PNGs on disk when each batch was decoded
    assert [p.name for p in written] == [f"{i:06d}.png" for i in range(10)]
    expected = pictures.to_uint8(generate(model, 10, seed=1))
    for path, pixels in zip(written, expected):
        assert np.array_equal(np.asarray(Image.open(path))[..., None], pixels)


def test_sample_script_never_overwrites_without_force(paths, tmp_path, capsys):
    cli = _script("sample.py")
    folder = tmp_path / "samples"
    cli.main(["--checkpoint", paths["gan"], "--num", "3", "--out", str(folder), "--device", "cpu"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SystemExit) as refused:
        cli.main(["--checkpoint", paths["gan"], "--num", "5", "--seed", "1", "--out", str(folder)])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sample.py: error: --out: '{folder}' already holds 3 of its PNGs (000000.png, ...); "
        "pass --force to replace, or write to another path"
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    cli.main(["--checkpoint", paths["gan"], "--num", "5", "--seed", "1", "--out", str(folder), "--force"])
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert (folder / "000000.png").read_bytes() != before["000000.png"]

    link = tmp_path / "link.pt"  # the checkpoint under another name is still the checkpoint
    link.symlink_to(paths["gan"])
    original = Path(paths["gan"]).read_bytes()
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", paths["gan"], "--num", "2", "--out", str(link), "--force"])
    assert "is the input --checkpoint" in capsys.readouterr().err
    assert Path(paths["gan"]).read_bytes() == original


# ----------------------------------------------------------------------------- evaluate.py --data
def test_evaluate_data_values_parse_as_on_the_command_line():
    with_overrides = _script("evaluate.py").with_overrides
    cfg = OmegaConf.create({"_target_": "x.Y", "batch_size": 64, "root": "./data", "holdout": 0, "download": True})
    out = with_overrides(cfg, ["batch_size=32", "root=/abs/data", "holdout=2000", "download=false"])
    assert out.batch_size == 32 and isinstance(out.batch_size, int)
    assert (out.root, out.holdout, out.download) == ("/abs/data", 2000, False)
    assert with_overrides(cfg, ["root=[1,2]"]).root == [1, 2] and with_overrides(cfg, ["root=null"]).root is None
    with pytest.raises(GantrainError, match=r"^--data foo: not a key of the run's data config \(x\.Y\); it has: batch"):
        with_overrides(cfg, ["foo=1"])
    for item in ("batch_size=1,2", "+foo=1", "batch_size=[1,"):
        with pytest.raises(GantrainError, match=rf"^--data '{re.escape(item)}': "):
            with_overrides(cfg, [item])


# ----------------------------------------------------------------------------- a corrupt image
COMMON = dict(batch_size=4, channels=1, resolution=8)


def test_a_corrupt_file_is_named_or_replaced_by_the_next_readable_one(tmp_path, caplog):
    root = image_folder(tmp_path / "imgs", 6, corrupt="002.png")
    with pytest.raises(DataError, match=r"^data\.path: cannot decode '002\.png' under .*; replace or remove the file"):
        ImageFolder(path=str(root), **COMMON).dataset()[2]
    png_with_corrupt_pixels(root / "005.png")  # the last file: its replacement wraps around to the first
    data = ImageFolder(path=str(root), skip_corrupt=True, **COMMON).dataset()
    with caplog.at_level(logging.WARNING, logger="gantrain.data.folder"):
        items = [data[i] for i in (2, 2, 5, 3, 0)]
    assert torch.equal(items[0], items[3]) and torch.equal(items[1], items[3]) and torch.equal(items[2], items[4])
    assert not torch.equal(items[3], items[4])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "'002.png'" in warned[0] and "'005.png'" in warned[1]  # once per file


def test_a_corrupt_file_read_by_a_worker_process_is_still_one_line(tmp_path):
    root = image_folder(tmp_path / "imgs", 8, corrupt="003.png")
    stream = BatchStream(ImageFolder(path=str(root), **COMMON).dataset(), 4, seed=0, in_memory=False, num_workers=1)
    with pytest.raises(DataError) as e:
        for _ in range(4):
            next(stream)
    assert str(e.value).startswith("data.path: cannot decode '003.png'") and "\n" not in str(e.value)


def _first_step_reading(name: str, n: int, batch_size: int, seed: int = 0) -> int:
    """The training step (1-based; D and G draw one batch each) whose batches first hold file ``name``
    of ``n``, from the stream's own order (a stream over the item indices)."""
    from gantrain.data import TensorImages

    stream = BatchStream(TensorImages(torch.arange(n).float().view(n, 1, 1, 1)), batch_size, seed=seed)
    for batch in range(10 * n):
        if int(name.removesuffix(".png")) in next(stream).x.flatten().long().tolist():
            return batch // 2 + 1
    raise AssertionError("never drawn")


def test_a_corrupt_file_mid_training_stops_at_a_checkpoint_that_resumes_bit_identically(tmp_path, one_thread):
    """The step before the one that would read the file is checkpointed; with the file replaced,
    trainer.resume=auto ends where an uninterrupted run ends, bit for bit."""
    n, name = 24, "011.png"
    step = _first_step_reading(name, n, batch_size=4)
    assert step >= 2, "pick a file first read after step 1"
    good = image_folder(tmp_path / "good", n)
    bad = image_folder(tmp_path / "bad", n, corrupt=name)
    overrides = [
        "data=folder",
        "data.channels=1",
        "data.num_workers=0",
        "data.batch_size=4",
        f"trainer.max_steps={step + 1}",
    ]
    overrides += ["model.g.ngf=8", "model.d.ndf=8", "trainer.checkpoint_every_n_steps=100"]
    train(make_cfg(*overrides, f"data.path={good}"), tmp_path / "straight")

    with pytest.raises(DataError, match=rf"cannot decode '{name}'.*stopped after step {step - 1}, saved in"):
        train(make_cfg(*overrides, f"data.path={bad}"), tmp_path / "run")
    saved = ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved["step"] == step - 1
    with pytest.raises(DataError, match=rf"cannot decode '{name}'.*stopped at step {step - 1}, where it resumed"):
        train(make_cfg(*overrides, f"data.path={bad}", "trainer.resume=auto"), tmp_path / "run")
    assert ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.ckpt")["step"] == step - 1  # untouched

    (bad / name).write_bytes((good / name).read_bytes())  # the user replaces the file
    train(make_cfg(*overrides, f"data.path={bad}", "trainer.resume=auto"), tmp_path / "run")
    resumed, straight = (ckpt_io.load(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("run", "straight"))
    assert resumed["step"] == straight["step"] == step + 1
    assert resumed["data"] == straight["data"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for phase, state in straight["optimizers"].items():
        for i, s in state["state"].items():
            for k, v in s.items():
                assert torch.equal(torch.as_tensor(resumed["optimizers"][phase]["state"][i][k]), torch.as_tensor(v))
