"""The decoding kernel's build folder, for tests of what happens around a build."""
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from satic.decoding.small_gemm import (BUILT, SOURCES, TORCH_LOCK, build_directory, built_directory, load_kernel,
                                       source_text)


def finished_build(root: Path) -> Path | None:
    """The folder of a finished build of the kernel under `root`, the threaded one first."""
    folders = (build_directory(source_text(), root, threaded=threaded) for threaded in (True, False))
    return next((folder for folder in folders if (folder / BUILT).exists()), None)


def compiled_here(shared: Path) -> Path:
    """A finished build of the kernel whose objects were compiled from this checkout's source files with this
    environment's torch headers: the user's usual build where it was made from them, else one made once per test
    run under `shared` (a folder every test process of the run sees). ninja compiles an object again when its
    command changed, and the command names the source's path and torch's include folders."""
    from torch.utils.cpp_extension import include_paths

    usual = built_directory(source_text())
    commands = (usual / "build.ninja").read_text()
    if f"compile {SOURCES[0]}" in commands and f"-isystem {include_paths()[0]} " in commands:
        return usual
    with open(shared / "kernel-build.lock", "w") as lock:  # one build for every test process of the run
        fcntl.flock(lock, fcntl.LOCK_EX)
        if finished_build(shared) is None:
            env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(shared), "PYTHONPATH": os.pathsep.join(sys.path)}
            done = subprocess.run([sys.executable, "-m", "satic", "build-kernels"], env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
        folder = finished_build(shared)
    return folder


def unfinished_build(root: Path, shared: Path) -> Path:
    """A build folder under `root` as a build stopped before its last step leaves it: the kernel's objects compiled
    (compiled_here), but no library and no mark of a finished build. A process that takes it up links the
    library, loads it and marks the build finished, as after a full build, in seconds rather than the compile's
    minute of CPU. Returns the folder."""
    reason = load_kernel()
    if reason is not None:
        pytest.skip(f"the kernel cannot be built here: {reason}")
    built = compiled_here(shared)
    folder = Path(root) / built.name
    shutil.copytree(built, folder, ignore=shutil.ignore_patterns("*.so", BUILT, TORCH_LOCK, "satic.lock"))
    assert any(folder.glob("*.o")) and not any(folder.glob("*.so")), sorted(p.name for p in folder.iterdir())
    return folder
