import signal
import subprocess
from pathlib import Path

import pytest

from browser import CHROMIUM, FLAGS, SKIP_REASON

# Tests of Ctrl-C send SIGINT to this process or to children it starts. A shell starts a background job (`make test
# &`, nohup) with SIGINT ignored, which every child inherits: Ctrl-C is given back its usual meaning here.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Decoding and SCST outputs of the original SATIC code on fixed random weights (README.txt there).
REFERENCE_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference-sat"


@pytest.fixture(scope="session")
def reference_fixture() -> Path:
    if not REFERENCE_FIXTURE.is_dir():
        pytest.fail(f"reference fixture missing: {REFERENCE_FIXTURE} (it ships with the repository)")
    return REFERENCE_FIXTURE


@pytest.fixture
def import_reference(reference_fixture):
    """import_reference(k, out, **options): `satic import-reference` of the fixture's weights with its K=k infos,
    their options changed as given (as another run of the reference's train.py would have saved them), into
    `out`; returns the exit code."""
    import pickle

    from satic.cli import main as satic_main

    def run(k: int, out: Path, **options) -> int:
        with open(reference_fixture / f"K{k}" / f"infos_sat-k{k}-fixture-best.pkl", "rb") as f:  # the repository's
            infos = pickle.load(f)
        for name, value in options.items():
            setattr(infos["opt"], name, value)
        changed = out.parent / f"infos-{out.name}.pkl"
        changed.write_bytes(pickle.dumps(infos, protocol=2))
        return satic_main(["import-reference", "--model", str(reference_fixture / "model-best.pth"),
                           "--infos", str(changed), "--out", str(out)])

    return run


@pytest.fixture(scope="session")
def reference_sat(reference_fixture):
    """reference_sat(k): the fixture's weights as an eval-mode SATModel of group size k (the weights are the
    same for every K); reference_sat.features: its features.npz arrays."""
    import dataclasses

    import numpy as np

    from satic.model import SATModel
    from satic.model.reference import load_reference_state_dict, model_from_reference, read_reference_infos

    state = load_reference_state_dict(reference_fixture / "model-best.pth")
    base, _, _ = model_from_reference(state,
                                      read_reference_infos(reference_fixture / "K1" / "infos_sat-k1-fixture-best.pkl"))

    def make(k: int) -> SATModel:
        model = SATModel(dataclasses.replace(base.config, group_size=k))
        model.load_state_dict(base.state_dict())
        return model.eval()

    make.features = dict(np.load(reference_fixture / "features.npz"))
    return make


@pytest.fixture
def help_text(capsys):
    """`satic ARGV --help` run in this process -> the help it printed as one line, whatever its wrapping (it must
    exit 0)."""
    from satic.cli import main

    def text(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    return text


@pytest.fixture()
def without_java(monkeypatch, tmp_path):
    """Score with the toolkit's Java-free path: METEOR's JVM start alone takes 30 s on the shared test
    machine; the Java metrics have their own tests in tests/evaluation. The small-row kernel is built
    first: its build needs ninja and g++ from PATH."""
    from satic.decoding.small_gemm import load_kernel

    load_kernel()
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))


@pytest.fixture
def unwritable(monkeypatch):
    """unwritable(folder, error=errno.EACCES): make `folder` one this process may not write, as satic.io's check
    sees it: os.access says no, and making a file there fails with `error` (None: succeeds, as for a process
    whose capabilities os.access leaves out). Root may write anywhere, so both are patched."""
    import errno
    import os
    import tempfile

    denied: dict[Path, int | None] = {}
    access, temporary = os.access, tempfile.TemporaryFile

    def refused(path, mode, **kwargs):
        return Path(path) not in denied and access(path, mode, **kwargs)

    def make(*args, dir=None, **kwargs):
        error = denied.get(Path(dir)) if dir is not None else None
        if error is not None:
            raise OSError(error, os.strerror(error))
        return temporary(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "access", refused)
    monkeypatch.setattr(tempfile, "TemporaryFile", make)

    def deny(folder: Path, error: int | None = errno.EACCES) -> None:
        denied[Path(folder)] = error

    return deny


@pytest.fixture
def removed_before_its_first_lock(monkeypatch):
    """removed_before_its_first_lock(path) -> the handles flock was called with: the file at `path` is removed just
    before the first lock is taken, as by a holder that finished between another process's open and its lock
    (satic.io.hold_file's race)."""
    import fcntl

    flock, calls = fcntl.flock, []

    def arm(path: Path) -> list:
        def removed_first(handle, operation):
            calls.append(handle)
            if len(calls) == 1:
                path.unlink()
            return flock(handle, operation)

        monkeypatch.setattr(fcntl, "flock", removed_first)  # as satic.io calls it
        return calls

    return arm


@pytest.fixture
def ctrl_c_as_regions_are_published(monkeypatch):
    """Call it to send one SIGINT, as a user's single Ctrl-C, right after a feature store's regions (its _att
    part, a folder or an LMDB file) are renamed into place; arm(times=2): two, as Ctrl-C pressed twice."""
    import signal

    from satic.data import stores

    def arm(times: int = 1) -> None:
        publish = stores.publish

        def interrupted(tmp, final, replace=True):
            publish(tmp, final, replace)
            if final.name.endswith(("_att", "_att.lmdb")):
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)

        monkeypatch.setattr(stores, "publish", interrupted)

    return arm


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


@pytest.fixture
def unfinished_build(tmp_path_factory):
    """unfinished_build(root): kernels.unfinished_build, its objects compiled once per test run."""
    import os

    import kernels

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's folder is in the run's
        shared = shared.parent
    return lambda root: kernels.unfinished_build(root, shared)
