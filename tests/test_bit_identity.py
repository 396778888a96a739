"""A refactor changes nothing a user sees: every recipe, a resumed run, a 2-rank torchrun run and a checkpoint
written before the structure change give checkpoints bit-identical to those the code before it wrote
(``tests/fixtures/``, see :mod:`tests.bit_identity`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests import bit_identity as bits
from tests.conftest import EXPERIMENTS

RECORDED = json.loads(bits.HASHES.read_text())
# CPU kernels may round differently in another torch release; the hashes hold for the one they were recorded with.
pytestmark = pytest.mark.skipif(
    torch.__version__ != RECORDED["torch"], reason=f"fixtures recorded with torch {RECORDED['torch']}"
)


def assert_same(got: dict[str, str], want: dict[str, str]) -> None:
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:10]
    differing = [k for k in want if got[k] != want[k]]
    assert not differing, f"{len(differing)} values differ, first: {differing[:5]}"


def test_every_recipe_is_recorded():
    assert sorted(RECORDED["recipes"]) == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_trains_bit_identically_to_before(tmp_path, experiment):
    assert_same(bits.recipe(tmp_path, experiment), RECORDED["recipes"][experiment])


def test_a_resumed_run_is_bit_identical_to_before(tmp_path):
    assert_same(bits.resumed(tmp_path, bits.RESUMED, "dcgan"), RECORDED["resumed_dcgan"])
    assert_same(bits.resumed(tmp_path, bits.RESUMED_WGAN_GP, "wgan_gp"), RECORDED["resumed_wgan_gp"])


def test_a_checkpoint_written_before_resumes_bit_exactly(tmp_path):
    """Step 10 of the dcgan run (BatchNorm, EMA), written by the code before the structure change, continued
    to step 20 equals that run trained to step 20 in one go by the code before."""
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(bits.OLD_CHECKPOINT, run / "checkpoints" / "last.ckpt")
    got = bits.train_in_process(run, *bits.RESUMED, f"trainer.max_steps={bits.STEPS}", "trainer.resume=auto")
    assert_same(got, RECORDED["straight_dcgan"])


@pytest.mark.slow
def test_a_torchrun_run_is_bit_identical_to_before(tmp_path):
    assert_same(bits.torchrun(tmp_path), RECORDED["torchrun"])
