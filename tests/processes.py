"""Helpers for tests that run real processes and signal them."""
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest


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


def traced_env(**extra: str) -> dict[str, str]:
    """The environment for a satic child: this interpreter's path, and faulthandler on, so that `finish` can make a
    child that hangs print its threads' stacks."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONFAULTHANDLER="1", **extra)


def finish(child: subprocess.Popen, timeout: float) -> tuple:
    """child.communicate(timeout=timeout); a child still running then (started with `traced_env`) is aborted, so
    that the failure shows where each of its threads waited, not only that it did."""
    try:
        return child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGABRT)
        try:
            _, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        pytest.fail(f"{' '.join(map(str, child.args))} did not exit within {timeout} s; what it printed, then its "
                    f"threads' stacks:\n{err}")


def satic_with_file_size_limit(args: list[str], limit: int, cwd: Path | None = None,
                               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m satic ARGS` where no file may grow past `limit` bytes (ulimit -f): a write past it fails with
    EFBIG, as a write to a full disk fails with ENOSPC (SIGXFSZ, which would kill the process instead, is ignored)."""
    import resource

    def limited() -> None:
        # the soft limit, the one the system enforces (`ulimit -S -f`); the hard one, above it, is left as it is
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "satic", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          preexec_fn=limited, timeout=timeout)


def failed_on_a_full_disk(done: subprocess.CompletedProcess, command: str, path: Path) -> bool:
    """Whether a satic command stopped with exit code 2, no traceback, and one error line, which names `path`, the
    refusal (the file size limit's, or a full disk's as a library that checks the room itself says it) and the fix."""
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"satic {command}: error: ")]
    said = (f"satic {command}: error: cannot write {path}: {reason}" for reason in ("File too large",
                                                                                   "No space left on device"))
    return (done.returncode == 2 and "Traceback" not in done.stderr and "Exception" not in done.stderr
            and len(errors) == 1 and any(map(errors[0].startswith, said)) and "free space" in errors[0])


def signalled_at_io_call(name: str, n: int, sig: int, after: bool = False) -> str:
    """A program for `python -c PROGRAM satic-args...`: `satic` that raises the real signal `sig` at its n-th call of
    satic.io's `name` (publish: as it puts an output in place), before the call or, with `after`, once it returned."""
    return f"""import signal, sys
from satic import io
from satic.cli import main
original, calls = io.{name}, []


def signalled(*args, **kwargs):
    calls.append(args)
    done = original(*args, **kwargs) if {after} else None
    if len(calls) == {n}:
        signal.raise_signal({int(sig)})
    return done if {after} else original(*args, **kwargs)


io.{name} = signalled
sys.exit(main())
"""


def killed_between_outputs_then_rerun(args: list[str], out: Path) -> None:
    """`satic ARGS --out OUT` killed with SIGKILL as it puts its second output in place leaves one of them; the same
    command run again says it replaces what the killed one left, and succeeds."""
    env = traced_env(OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", signalled_at_io_call("publish", 2, signal.SIGKILL), *args, "--out", str(out)], env=env,
                            capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) == 1
    rerun = subprocess.run([sys.executable, "-m", "satic", *args, "--out", str(out)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{out} holds the files of a satic {args[0]} that was killed before it finished" in rerun.stderr
