"""A tiny built-in dataset shared by the training tests."""
from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from satic.data.synth import prepare_builtin

    out = tmp_path_factory.mktemp("data") / "builtin"
    prepare_builtin(out, images=40, seed=3, feature_dim=12)
    return out
