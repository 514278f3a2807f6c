"""Tiny checkpoints for the serving tests: a bottom-up one, a grid one (image files) and the
reference fixture's K=2 import."""
from __future__ import annotations

import pytest

from satic.cli import main as satic_main
from satic.data.vocab import Vocabulary
from satic.model.checkpoint import FeatureSpec, save_checkpoint

from serve_helpers import GRID, WORDS, load, tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-k2", tiny_model(0, 2), Vocabulary(WORDS))


@pytest.fixture(scope="session")
def grid_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("grid") / "grid-k1", tiny_model(1, 1, 1280), Vocabulary(WORDS),
                           FeatureSpec(kind="grid", extractor=GRID))


@pytest.fixture(scope="session")
def fixture_k2(reference_fixture, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref-k2"
    code = satic_main(["import-reference", "--model", str(reference_fixture / "model-best.pth"),
                       "--infos", str(reference_fixture / "K2" / "infos_sat-k2-fixture-best.pkl"), "--out", str(path)])
    assert code == 0
    return path


@pytest.fixture(scope="session")
def captioners(tiny_checkpoint, grid_checkpoint):
    """Loaded once for the whole run: {name: Captioner}, the bottom-up model first (the default)."""
    return {"tiny": load(tiny_checkpoint, "tiny"), "grid": load(grid_checkpoint, "grid")}


