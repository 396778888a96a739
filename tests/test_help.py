"""Issue 26, item 5: ``python -m gantrain --help`` is gantrain's own text (recipes with their one line, the config
groups and their options, the main keys, where the README is), with no Hydra ``schema/*`` internals, and it imports
neither torch nor Hydra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gantrain.cli import HIDDEN_GROUPS, config_dir, summary

CONFIGS = config_dir()
RECIPES = sorted(CONFIGS.glob("experiment/*.yaml"))


def gantrain_help(flag: str) -> str:
    r = subprocess.run([sys.executable, "-m", "gantrain", flag], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_recipe_group_and_option(flag):
    text = gantrain_help(flag)
    lines = text.splitlines()
    assert lines[0].startswith("usage: python -m gantrain [+experiment=RECIPE]")
    assert len(RECIPES) == 15
    for recipe in RECIPES:  # each with its own line, from the recipe's first comment line
        assert f"  {recipe.stem:<13}{summary(recipe)}" in lines
    folders = [p for p in CONFIGS.rglob("*") if p.is_dir() and list(p.glob("*.yaml"))]
    groups = {p.relative_to(CONFIGS).as_posix(): sorted(q.stem for q in p.glob("*.yaml")) for p in folders}
    shown = [g for g in groups if g not in HIDDEN_GROUPS]
    assert {"model", "loss", "optim", "data", "trainer", "augment", "metrics", "metrics/extractor"} <= set(shown)
    for group in shown:
        (line,) = [x for x in lines if x.startswith(f"  {group} ")]
        assert line.split(None, 1)[1].replace("*", "").split(", ") == groups[group], line
    assert "  model              dcgan*, mlp, resnet, vae, vae_mlp, vaegan" in lines  # train.yaml's defaults
    assert "  metrics/extractor  inception*, mnist" in lines  # metrics/fid.yaml's
    assert "  metrics            fid" in lines  # none by default
    assert "schema" not in text and "hydra/job_logging" not in text
    assert "  trainer.max_steps " in text and "  hydra.run.dir " in text
    assert "Hydra's own help: python -m gantrain --hydra-help" in lines
    readme = CONFIGS.parent / "README.md"
    assert lines[-1] == f"Documentation: {readme}" and readme.is_file()


def test_every_recipe_has_a_one_line_summary():
    for recipe in RECIPES:
        first, second = recipe.read_text().splitlines()[:2]
        assert first == "# @package _global_", recipe.name
        assert second.startswith("# ") and 20 <= len(summary(recipe)) <= 95, (recipe.name, second)


def test_help_imports_neither_torch_nor_hydra():
    """What ``python -m gantrain --help`` runs, with sys.modules read at the end (not a timing)."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['gantrain', '--help']\n"
        "runpy.run_module('gantrain', run_name='__main__')\n"
        "print('LOADED', sorted(m for m in ('torch', 'hydra', 'omegaconf', 'yaml') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "LOADED []"
    assert "recipes (+experiment=RECIPE" in r.stdout


def test_hydra_help_stays_hydras():
    r = subprocess.run([sys.executable, "-m", "gantrain", "--hydra-help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Hydra (" in r.stdout and "recipes (+experiment=RECIPE" not in r.stdout
