"""Every experiment composes, instantiates and trains for 2 CPU steps; config mistakes fail loudly."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

from gantrain.config import CONFIG_DIR
from gantrain.train import compose_config, train
from tests.conftest import EXPERIMENTS, REPO, make_cfg

# What every GAN run must log (the README and the issue name these tags).
EXPECTED_LOGS = {
    "loss/D",
    "loss/G",
    "D(x)",
    "D(G(z))",
    "grad_norm/D",
    "grad_norm/G",
    "lr/D",
    "lr/G",
    "perf/images_per_s",
}


# What every VAE run logs instead (a single phase named VAE); a VAE-GAN logs the GAN's and these.
VAE_LOGS = {"loss/VAE", "loss/recon", "loss/kl", "elbo", "grad_norm/VAE", "lr/VAE", "perf/images_per_s"}
VAEGAN_LOGS = EXPECTED_LOGS | {"loss/recon", "loss/kl"}


def expected_logs(loss_target: str) -> set[str]:
    kind = loss_target.rsplit(".", 1)[-1]
    return {"VAEGANObjective": VAEGAN_LOGS, "VAEObjective": VAE_LOGS}.get(kind, EXPECTED_LOGS)


def test_experiments_are_found():
    assert {"dcgan", "wgan_gp"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_trains_two_steps(tmp_path, experiment):
    cfg = make_cfg(f"+experiment={experiment}")
    assert cfg.experiment_name == experiment
    metrics = train(cfg, tmp_path)
    assert metrics["step"] == 2
    assert expected_logs(cfg.loss._target_) <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "samples" / "step_0000002.png").is_file()


def test_wgan_gp_recipe_values():
    cfg = make_cfg("+experiment=wgan_gp", tiny=False)
    assert cfg.trainer.n_critic == 5
    assert cfg.loss.adversarial._target_ == "gantrain.losses.WassersteinLoss"
    assert cfg.loss.gp.weight == 10.0 and cfg.loss.r1.gamma == 0 and cfg.loss.weight_clip.clip == 0
    assert cfg.model.d.norm != "batch"  # the penalty is per sample
    assert cfg.optim.g.lr == cfg.optim.d.lr == 1e-4 and list(cfg.optim.g.optimizer.betas) == [0.5, 0.9]


def test_dcgan_recipe_values():
    cfg = make_cfg("+experiment=dcgan", tiny=False)
    assert (cfg.model.g.nz, cfg.model.g.ngf, cfg.model.d.ndf, cfg.model.resolution) == (100, 64, 64, 32)
    assert cfg.model.init == "normal_0.02" and cfg.loss.adversarial.saturating is False
    assert cfg.optim.g.lr == cfg.optim.d.lr == 4e-4  # tuned for 2,000 steps (docs/benchmarks.md); the paper: 2e-4
    assert list(cfg.optim.g.optimizer.betas) == list(cfg.optim.d.optimizer.betas) == [0.5, 0.999]
    assert cfg.model.channels == cfg.data.channels == 1  # channels follow the data
    assert cfg.data.resolution == 32


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(MissingConfigException, match=r"(?s)Could not find 'experiment/wgan_gpp'.*dcgan.*wgan_gp"):
        make_cfg("+experiment=wgan_gpp")


def test_misspelled_key_on_the_command_line_fails():
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("trainer.n_critc=3")
    assert "Key 'n_critc' not in 'TrainerSettingsConfig'" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        make_cfg("optim.g.learning_rate=1e-3")


def test_misspelled_key_in_an_experiment_file_fails(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  n_critc: 5\n")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        with pytest.raises(
            ConfigCompositionException, match=r"(?s)In 'experiment/typo'.*Key 'n_critc' not in 'TrainerSettingsConfig'"
        ):
            compose(config_name="train", overrides=["+experiment=typo"])


def test_missing_folder_path_names_the_key():
    cfg = make_cfg("data=folder")
    with pytest.raises(MissingMandatoryValue, match=r"data.path"):
        cfg.data.path  # noqa: B018


def test_every_group_option_builds_a_target():
    """Each option's target comes from its schema (the YAML holds only deltas); optim.<net> holds a torch partial."""
    for group in ("model", "loss", "data", "trainer", "augment"):
        for f in (CONFIG_DIR / group).glob("*.yaml"):
            overrides = [f"{group}={f.stem}"] + (["data.path=/tmp"] if f.stem == "folder" else [])
            assert make_cfg(*overrides)[group]._target_, f
    for f in (CONFIG_DIR / "optim").glob("*.yaml"):
        for net in ("g", "d"):
            node = make_cfg(f"optim={f.stem}").optim[net]
            assert node._target_ == "gantrain.optim.NetworkOptim", f
            assert node.optimizer._target_.startswith("torch.optim.") and node.optimizer._partial_ is True, f


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_bf16_mixed_trains_on_cpu(tmp_path, experiment):
    metrics = train(make_cfg(f"+experiment={experiment}", "trainer.precision=bf16-mixed"), tmp_path)
    assert metrics["step"] == 2
    assert all(math.isfinite(v) for v in metrics.values())


IMAGE_EXPERIMENTS = [e for e in EXPERIMENTS if not e.startswith("toy_")]
TOY_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("toy_")]


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory):
    # The README's `data=folder data.path=../shared/data/mnist-t10k/png data.channels=1`, on 40 of its PNGs.
    from tests.conftest import shared_mnist

    folder = tmp_path_factory.mktemp("png")
    for src in sorted((shared_mnist() / "png").rglob("*.png"))[:40]:
        dst = folder / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return folder


# The default run trains one GAN, one conditional GAN and one VAE on the folder, the other recipes only with `slow`
# (~12 s each): every recipe trains in the default run on the default data (test_experiment_trains_two_steps).
ON_FOLDER_BY_DEFAULT = ("dcgan", "cgan_pd", "vae_mlp")


@pytest.mark.parametrize(
    "experiment",
    [e if e in ON_FOLDER_BY_DEFAULT else pytest.param(e, marks=pytest.mark.slow) for e in IMAGE_EXPERIMENTS],
)
def test_image_experiment_on_mnist_folder(tmp_path, mnist_folder, experiment):
    # no held-out ELBO without held-out images: a recipe that monitors it monitors its loss here
    elbo = compose_config(f"+experiment={experiment}").trainer.monitor == "metrics/elbo"
    cfg = make_cfg(
        f"+experiment={experiment}",
        "data=folder",
        f"data.path={mnist_folder}",
        "data.channels=1",
        "data.holdout=0",  # 40 images: a recipe's held-out split (vae_mnist: 2,000) would leave none to train on
        "trainer.max_steps=3",
        *["trainer.monitor=loss/VAE"] * elbo,
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["step"] == 3 and all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("data, modes", [("ring8", 8), ("grid25", 25)])
@pytest.mark.parametrize("experiment", TOY_EXPERIMENTS)
def test_toy_experiment_logs_mode_metrics(tmp_path, experiment, data, modes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(make_cfg(f"+experiment={experiment}", f"data={data}", "trainer.max_steps=3"), tmp_path)
    assert 0 <= metrics["toy/modes"] <= modes and 0 <= metrics["toy/hq"] <= 100
    assert all(math.isfinite(v) for v in metrics.values())
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert {"toy/modes", "toy/hq"} <= set(acc.Tags()["scalars"])
    assert acc.Images("samples")[-1].width == 512  # the scatter plot, not an image grid


def test_dcgan_at_64_px(tmp_path):
    metrics = train(make_cfg("+experiment=dcgan", "model.resolution=64"), tmp_path)
    assert metrics["step"] == 2
    assert (tmp_path / "samples" / "step_0000002.png").is_file()


def _readme_commands() -> list[list[str]]:
    """The overrides of every ``python -m gantrain ...`` and ``torchrun ... -m gantrain ...`` line in the README's
    code blocks (after any leading ``VAR=value``); tests/test_distributed.py runs torchrun and the launchers."""
    commands = []
    for line in (REPO / "README.md").read_text().splitlines():
        line = re.sub(r"^(\w+=\S+ )+", "", line)
        launch = re.match(r"(python|torchrun( --?[\w-]+(=\S+)?)*) -m gantrain ", line)
        if launch is None or "hydra.searchpath" in line:
            continue  # the outside-the-repo walkthrough runs end to end in tests/test_structure.py
        args = line[launch.end() :].split("#")[0].split()
        overrides = []
        for a in args:
            if a in ("-m", "--cfg", "job") or a.startswith("hydra."):
                continue
            key, _, value = a.partition("=")
            overrides.append(f"{key}={value.split(',')[0]}" if "," in value and "[" not in value else a)
        commands.append(overrides)
    return commands


def test_every_readme_command_composes():
    """The README's train commands name real keys and options (a renamed key would fail here)."""
    commands = _readme_commands()
    assert len(commands) >= 15
    for overrides in commands:
        cfg = compose_config(*overrides)
        instantiate(cfg.trainer)  # settings validation (precision, clip algorithm, ema)
        for net in cfg.optim:
            if cfg.optim[net].schedule is not None:
                instantiate(cfg.optim[net].schedule)


# README commands that cannot succeed here, and the one-line error each must stop with instead.
README_EXPECTED_ERRORS = {
    "trainer.device=cuda": "trainer.device='cuda' but CUDA is not available",  # no GPU on this machine
    "loss.perceptual.weights_path=weights/vgg16-397923af.pth": "loss.perceptual.weights_path",  # no such file here
    "trainer.resume=path/to/last.ckpt": "checkpoint 'path/to/last.ckpt' does not exist",  # a placeholder path
    # the FID Inception's weights: not in this offline machine's cache; a placeholder path
    "metrics=fid": "metrics.extractor.weights_path=",
}


@pytest.mark.parametrize("overrides", _readme_commands(), ids=lambda o: " ".join(o)[:80])
def test_every_readme_command_trains_two_steps(tmp_path, overrides):
    """Each README train command runs as written, shrunk to 2 steps on tiny networks (a composed
    command can still fail at run time); a command needing what this machine lacks stops with its
    one-line error. Multirun lines run their first value; ``--cfg job`` lines train too."""
    from gantrain.errors import GantrainError
    from gantrain.hydra_errors import user_error
    from tests.conftest import TINY

    keys = {o.split("=")[0] for o in overrides}
    # README's trainer.max_steps=5000 becomes 2; its other settings (trainer.device=cuda) stay as written.
    cfg = make_cfg(*overrides, *[t for t in TINY if t.startswith("trainer.max_steps") or t.split("=")[0] not in keys])
    expected = [msg for key, msg in README_EXPECTED_ERRORS.items() if key in overrides]
    if "trainer.device=cuda" in overrides and torch.cuda.is_available():
        expected = []
    if "metrics=fid" in overrides and not any("weights_path=" in o for o in overrides):
        from gantrain.metrics.inception import cached_weights

        expected = [] if cached_weights().is_file() else expected
    try:
        metrics = train(cfg, tmp_path / "run")
    except Exception as e:  # what the command line prints: the unwrapped user error
        err = user_error(e)
        if not expected or err is None:
            raise
        assert isinstance(err, GantrainError) and expected[0] in str(err), err
        return
    assert not expected, f"expected the error {expected[0]!r}"
    assert metrics["step"] == 2 and all(math.isfinite(v) for v in metrics.values())
