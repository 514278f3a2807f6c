"""Helpers for tests that run real processes and signal them."""
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def default_sigint() -> None:
    """In the child: SIGINT as in a terminal. A shell runs background jobs with SIGINT ignored, a child
    inherits that, and Python then keeps ignoring it (so Ctrl-C could not reach the child)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def processes_mentioning(text: str) -> list[int]:
    """The ids of this machine's live processes whose command line contains `text` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (entry / "status").read_text().splitlines()
                          if line.startswith("State:")), "")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in command and "zombie" not in state:
            found.append(int(entry.name))
    return found


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def nobody_runs_satic() -> bool:
    """Whether a process of user nobody can import satic here: we are root with setpriv, and the checkout and
    its environment are readable by others (a clone in a private temporary folder is not)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import numpy, satic"], capture_output=True, env=env,
                          cwd="/")
    return done.returncode == 0
