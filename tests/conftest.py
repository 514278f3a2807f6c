from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE_FIXTURE = SHARED / "fixtures" / "reference-sat"


@pytest.fixture(scope="session")
def reference_fixture() -> Path:
    if not REFERENCE_FIXTURE.is_dir():
        pytest.fail(f"shared fixtures missing: {REFERENCE_FIXTURE} (the checkout needs ../shared beside it)")
    return REFERENCE_FIXTURE


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny models on a shared 2-core machine (pytest -n 2): extra threads only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
