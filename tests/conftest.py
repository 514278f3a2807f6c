import subprocess
from pathlib import Path

import pytest

from browser import CHROMIUM, FLAGS, SKIP_REASON

# Decoding and SCST outputs of the original SATIC code on fixed random weights (README.txt there).
REFERENCE_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference-sat"


@pytest.fixture(scope="session")
def reference_fixture() -> Path:
    if not REFERENCE_FIXTURE.is_dir():
        pytest.fail(f"reference fixture missing: {REFERENCE_FIXTURE} (it ships with the repository)")
    return REFERENCE_FIXTURE


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny models on a shared 2-core machine (pytest -n 2): extra threads only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture
def chromium(tmp_path):
    """Run headless Chromium with a fresh profile and no background networking: chromium(*args) ->
    CompletedProcess. Skips the test where no Chromium is installed (`make browser` installs it)."""
    if CHROMIUM is None:
        pytest.skip(SKIP_REASON)
    flags = [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)

    return run
