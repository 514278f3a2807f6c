"""The decoding kernel's build folder, for tests of what happens around a build."""
import shutil
from pathlib import Path

import pytest

from satic.decoding.small_gemm import BUILT, TORCH_LOCK, built_directory, load_kernel, source_text


def unfinished_build(root: Path) -> Path:
    """A build folder under `root` as a build stopped before its last step leaves it: the kernel's objects compiled
    (this machine's, from its usual cache, built there first if need be), but no library and no mark of a finished
    build. A process that takes it up links the library, loads it and marks the build finished, as after a full
    build, in seconds rather than the compile's minute of CPU. Returns the folder."""
    reason = load_kernel()
    if reason is not None:
        pytest.skip(f"the kernel cannot be built here: {reason}")
    built = built_directory(source_text())
    folder = Path(root) / built.name
    shutil.copytree(built, folder, ignore=shutil.ignore_patterns("*.so", BUILT, TORCH_LOCK, "satic.lock"))
    assert any(folder.glob("*.o")) and not any(folder.glob("*.so")), sorted(p.name for p in folder.iterdir())
    return folder
