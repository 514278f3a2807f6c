import pytest

from satic.data.synth import prepare_builtin


@pytest.fixture(scope="session")
def builtin(tmp_path_factory):
    """A tiny prepared built-in dataset (40 images, 8-dim features), shared by the data tests."""
    return prepare_builtin(tmp_path_factory.mktemp("builtin"), images=40, seed=3, feature_dim=8)
