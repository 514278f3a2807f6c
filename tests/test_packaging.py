"""The sdist and wheel that `python -m build` makes install into a new environment and work there:
the `satic` command, its configs and the kernel source come from the installed package, not from
this checkout."""
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ("satic/configs/demo/demo.yaml", "satic/configs/coco/sat_k2_scst.yaml", "satic/csrc/small_gemm.cpp",
                "satic/csrc/encoder.cpp", "satic/csrc/decoder.cpp", "satic/csrc/small_gemm.h", "satic/csrc/simd.h")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built from this checkout, without network (this environment's setuptools)."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


def new_env(path: Path) -> Path:
    """A new virtual environment that sees this one's installed dependencies (torch and the rest) as
    a plain path entry, so satic itself comes only from what is installed into it."""
    venv.create(path, with_pip=False)
    site = Path(subprocess.run([str(path / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path


def install(env: Path, dist: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-build-isolation", str(dist)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ["PATH"] = f"{env / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=environ, timeout=600)


def test_dists_hold_the_package_data(dists):
    sdist, wheel = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(PACKAGE_DATA) <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {f"src/{p}" for p in PACKAGE_DATA} <= members and "pyproject.toml" in members and "README.md" in members


def test_wheel_installs_and_runs_the_fast_demo(dists, tmp_path):
    _, wheel = dists
    env = new_env(tmp_path / "env")
    install(env, wheel)
    where = run(env, "python", "-c", "import satic, satic.config as c; print(satic.__file__); print(c.configs_dir())",
                cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-2000:]
    module, configs = where.stdout.split()
    assert Path(module).is_relative_to(env) and Path(configs).is_relative_to(env)  # not this checkout
    version = run(env, "satic", "--version", cwd=tmp_path)
    assert version.returncode == 0 and "0.1.0" in version.stdout + version.stderr
    demo = run(env, "satic", "demo", "--fast", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert {"report.json", "gallery.html", "speed_quality.png"} <= {p.name for p in (tmp_path / "demo").iterdir()}


def test_sdist_installs(dists, tmp_path):
    sdist, _ = dists
    env = new_env(tmp_path / "env")
    install(env, sdist)
    listed = run(env, "python", "-c", "from satic.config import configs_dir; "
                 "print(sorted(p.name for p in (configs_dir() / 'coco').iterdir()))", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "sat_k2_xe.yaml" in listed.stdout
    assert run(env, "satic", "--help", cwd=tmp_path).returncode == 0
