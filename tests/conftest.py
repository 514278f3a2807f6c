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
