"""Commands stopped by SIGTERM or Ctrl-C (SIGINT), in real processes with real signals: `satic features extract`
stopped mid-way leaves nothing behind (no half store, no temporary folders); a signal while a command is still
loading (satic.cli, torch), makes its first progress bar or runs a finalizer, or once it is exiting, ends it with
its one line and status, never a traceback, a lost signal or a half-loaded library."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from processes import default_sigint, finish, traced_env


def signal_as_import_starts(module: str, sig: int) -> str:
    """The first lines of a `python -c` program: a real signal `sig` is raised as the import of `module` starts (a
    sys.meta_path entry), wherever that import comes from."""
    return ("import signal, sys\n"
            "class Signal:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {module!r}:\n"
            f"            signal.raise_signal({int(sig)})\n"
            "sys.meta_path.insert(0, Signal())\n")


def test_extract_cleans_up_on_sigterm_and_sigint(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(600):  # a few seconds of extraction: long enough to be stopped mid-way
        Image.fromarray(np.full((32, 32, 3), i % 256, np.uint8)).save(images / f"{i}.png")
    env = traced_env(OMP_NUM_THREADS="1")
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):  # both at once: the two cores share the start-up
        out = tmp_path / sig.name
        out.mkdir()
        runs[sig] = out, subprocess.Popen(
            [sys.executable, "-m", "satic", "features", "extract", "--images", str(images), "--out",
             str(out / "grid_att"), "--size", "32", "--batch-size", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    waiting = dict(runs)  # polled together: each child is signalled as soon as it writes its first features
    deadline = time.monotonic() + 120
    while waiting:
        for sig, (out, child) in list(waiting.items()):
            if any(out.glob(".*/*.npz")):  # features are being written into a hidden temporary folder
                child.send_signal(sig)
                del waiting[sig]
            else:
                assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "extraction did not start within 120 s"
        time.sleep(0.005)
    for sig, (out, child) in runs.items():
        _, err = finish(child, 120)
        assert child.returncode == 128 + sig, err.decode()
        assert "Traceback" not in err.decode()
        assert sorted(p.name for p in out.iterdir()) == []  # no store, no sidecar, no temporary folders


def test_ctrl_c_while_the_interpreter_exits_after_the_command_is_done_prints_no_traceback(tmp_path):
    # SIGINT sent from an exit handler: the moment torch's own exit handlers (torch.library) run
    program = ("import atexit, os, signal, sys; from satic.cli import main; "
               "atexit.register(os.kill, os.getpid(), signal.SIGINT); sys.exit(main())")
    out = tmp_path / "synth"
    child = subprocess.Popen([sys.executable, "-c", program, "synth", str(out), "--images", "3", "--feature-dim", "4"],
                             env=traced_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=default_sigint)
    _, err = finish(child, 120)
    assert child.returncode == -signal.SIGINT, err.decode()
    assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode()
    assert (out / "dataset.json").is_file()


def test_sigterm_while_the_interpreter_exits_after_a_command_that_set_no_handler_prints_no_traceback():
    """`satic --version` returns before the command's handlers are set: a SIGTERM once it is done (sent from an exit
    handler) ends the process as the signal does, not with the traceback of the handler the entry point set while
    satic.cli loaded."""
    program = ("import atexit, os, signal, sys\n"
               "atexit.register(os.kill, os.getpid(), signal.SIGTERM)\n"
               "from satic.__main__ import run; sys.exit(run())")
    child = subprocess.Popen([sys.executable, "-c", program, "--version"], env=traced_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=default_sigint)
    out, err = finish(child, 60)
    assert (child.returncode, err) == (-signal.SIGTERM, b""), err.decode()
    assert out.startswith(b"satic ")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
@pytest.mark.parametrize("entry", ["satic", "python -m satic"])
def test_a_signal_while_the_command_is_still_loading_prints_one_line(tmp_path, entry, sig):
    """Ctrl-C or SIGTERM while satic.cli itself is being imported (the first fraction of a second, before main
    catches them), through the `satic` command's entry point and through `python -m satic`: one line and status 130
    or 143, as later; not an import traceback, nor a silent death by the signal."""
    start = ("from satic.__main__ import run; sys.exit(run())" if entry == "satic" else
             "import runpy; runpy.run_module('satic', run_name='__main__')")
    program = signal_as_import_starts("satic.errors", sig) + start  # imported by satic.cli
    child = subprocess.Popen([sys.executable, "-c", program, "synth", str(tmp_path / "synth")], env=traced_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    out, err = finish(child, 60)
    said = "interrupted" if sig == signal.SIGINT else "terminated"
    assert (child.returncode, out, err) == (128 + sig, b"", f"satic: {said}\n".encode())
    assert not (tmp_path / "synth").exists()


def test_the_satic_command_starts_where_ctrl_c_is_caught_while_loading():
    from importlib.metadata import distribution

    (script,) = [e for e in distribution("satic").entry_points if e.group == "console_scripts"]
    assert (script.name, script.value) == ("satic", "satic.__main__:run")


def test_ctrl_c_while_torch_loads_acts_once_torch_is_whole(tmp_path):
    """A real SIGINT as torch's import reaches its C++ part (torch._C), whose start-up clears errors raised in Python
    code it calls (a Ctrl-C there was lost, or left numpy half loaded): the command is interrupted, with one line
    and status 130, once torch's import has run to its end."""
    program = (signal_as_import_starts("torch._C", signal.SIGINT) + "import atexit\n"
               "atexit.register(lambda: print([m for m in ('numpy', 'torch.nn', 'torch.optim') if m in sys.modules]))\n"
               "from satic.__main__ import run; sys.exit(run())")
    env = traced_env(TORCH_EXTENSIONS_DIR=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", program, "build-kernels"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=default_sigint)
    out, err = finish(child, 120)
    assert (child.returncode, err) == (128 + signal.SIGINT, b"satic build-kernels: interrupted\n"), err.decode()
    assert out == b"['numpy', 'torch.nn', 'torch.optim']\n"
    assert list(tmp_path.iterdir()) == []  # nothing built


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_signal_while_the_first_progress_bar_is_made_prints_one_line(tmp_path, sig):
    """A real signal as the first progress bar imports multiprocessing (for tqdm's lock): the bar is finished before
    the signal acts, so the command ends with its one line and status, not an "Exception ignored" traceback from a
    half-made bar, and leaves no dataset behind."""
    program = signal_as_import_starts("multiprocessing", sig) + "from satic.__main__ import run; sys.exit(run())"
    out = tmp_path / "synth"
    child = subprocess.Popen([sys.executable, "-c", program, "synth", str(out), "--images", "3", "--feature-dim", "4"],
                             env=traced_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=default_sigint)
    _, err = finish(child, 60)
    verb = "interrupted" if sig == signal.SIGINT else "terminated"
    assert (child.returncode, err.decode().splitlines()[-1:]) == (128 + sig, [f"satic synth: {verb}"]), err.decode()
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode()
    assert not out.exists() or [p.name for p in out.iterdir()] == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_signal_whose_exception_a_finalizer_loses_still_stops_the_command(tmp_path, sig):
    """A real signal handled while Python runs an object's __del__, where the exception its handler raises is only
    reported and dropped: the command does not run on to status 0, it ends with its one line and 128 + the signal,
    and without the dropped exception's traceback."""
    program = ("import signal, sys\n"
               "import satic.cli.synth as command\n"
               "prepare = command.prepare_builtin\n"
               "class Finalized:\n"
               "    def __del__(self):\n"
               f"        signal.raise_signal({int(sig)})\n"
               "def prepare_builtin(*args, **kwargs):\n"
               "    Finalized()  # collected at once\n"
               "    return prepare(*args, **kwargs)\n"
               "command.prepare_builtin = prepare_builtin\n"
               "from satic.__main__ import run; sys.exit(run())")
    child = subprocess.Popen([sys.executable, "-c", program, "synth", str(tmp_path / "synth"), "--images", "3",
                              "--feature-dim", "4"], env=traced_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, preexec_fn=default_sigint)
    _, err = finish(child, 60)
    verb = "interrupted" if sig == signal.SIGINT else "terminated"
    assert (child.returncode, err.decode().splitlines()[-1:]) == (128 + sig, [f"satic synth: {verb}"]), err.decode()
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_signal_lost_in_a_weakref_callback_stops_the_demo_where_it_came(tmp_path, sig):
    """A real signal handled in a weak reference's callback (as torch runs them while a stage builds its model),
    where the exception its handler raises is dropped: the demo stops there, before its first stage trains, and
    says how to resume, rather than training every stage and writing its report first."""
    program = ("import signal, sys, time, weakref\n"
               "import satic.training.demo as demo\n"
               "run_stage = demo.run_stage\n"
               "class Model:\n"
               "    pass\n"
               "def stage(*args, **kwargs):\n"
               f"    weakref.ref(Model(), lambda ref: signal.raise_signal({int(sig)}))  # called at once\n"
               "    for _ in range(500):  # the stage's work, which the signal stops\n"
               "        time.sleep(0.01)\n"
               "    return run_stage(*args, **kwargs)\n"
               "demo.run_stage = stage\n"
               "from satic.__main__ import run; sys.exit(run())")
    out = tmp_path / "demo"
    child = subprocess.Popen([sys.executable, "-c", program, "demo", "--fast", "--out", str(out)],
                             env=traced_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=default_sigint)
    _, err = finish(child, 120)
    verb = "interrupted" if sig == signal.SIGINT else "terminated"
    lines = err.decode().splitlines()
    assert (child.returncode, lines[-1:]) == (128 + sig, [f"satic demo: {verb}"]), err.decode()
    assert lines[-2].startswith(f"satic demo: stopped; `satic demo --out {out} --fast --resume` continues it")
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode()
    assert sorted(p.name for p in out.iterdir()) == [".satic-demo"]  # no stage trained, no report
