"""Progress on a terminal is a tqdm bar; in a file or a pipe it is whole lines, one every LINE_INTERVAL_S seconds,
with nothing a log reader cannot read (no carriage returns, no redraws)."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import types

import pytest
import tqdm.std as tqdm_std
from tqdm import tqdm

from satic.progress import LINE_INTERVAL_S, LogLines, bar_class, new_bar, progress_bar

from processes import traced_env


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock, moved by the test."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    clock = Clock()
    monkeypatch.setattr(tqdm_std, "time", clock)
    return clock


def counts(text: str) -> list[str]:
    """The 'n/total' of each progress line."""
    return [line.split("% ")[1].split(" ")[0] for line in text.splitlines() if line.startswith("work:")]


def test_a_log_gets_a_line_at_the_start_every_interval_and_at_the_end(clock):
    out = io.StringIO()
    bar = new_bar(total=20, desc="work", unit="img", file=out)
    assert type(bar) is LogLines
    for step in [7] * 10 + [1] * 10:  # ten images 7 s apart, then ten 1 s apart: 80 s in all
        clock.now += step
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    # 30 s after the line before, at the first update then (35 s, 70 s), and at the end; a count whose line
    # was written is not written again
    assert counts(text) == ["0/20", "5/20", "10/20", "20/20"]
    assert text.splitlines()[-1] == "work: 100% 20/20 [01:20<00:00,  4.00s/img]"  # the whole run's rate


def test_a_log_gets_the_last_count_when_the_work_ends_between_lines(clock):
    out = io.StringIO()
    with new_bar(total=4, desc="work", file=out) as bar:
        bar.update(3)
        clock.now += 12
        bar.set_postfix({"loss": "2.500"}, refresh=False)
        bar.update(1)
    assert out.getvalue().splitlines() == ["work:   0% 0/4 [00:00<?, ?it/s]",
                                           "work: 100% 4/4 [00:12<00:00,  3.00s/it, loss=2.500]"]


def test_messages_between_lines_stand_on_their_own(clock):
    out = io.StringIO()
    bar = new_bar(total=10, desc="work", file=out)
    tqdm.write("validation: nothing counted since the last line", file=out)  # no line repeated after it
    clock.now += 5
    bar.update(2)
    tqdm.write("validation: two counted", file=out)  # the count moved: a line for it, after the message
    tqdm.write("validation: again", file=out)
    bar.close()
    assert out.getvalue().splitlines() == ["work:   0% 0/10 [00:00<?, ?it/s]",
                                           "validation: nothing counted since the last line",
                                           "validation: two counted",
                                           "work:  20% 2/10 [00:05<00:20,  2.50s/it]",
                                           "validation: again"]


def test_a_line_is_written_as_soon_as_the_interval_has_passed_and_reaches_the_file_at_once(clock, tmp_path):
    """One more image after the interval gets its line, and the line is in the file as it is written (a log read with
    `tail -f` while the work goes on), not when the bar closes."""
    with open(tmp_path / "log", "w") as log:
        bar = new_bar(total=3, desc="work", file=log)
        clock.now += 31
        bar.update(1)
        assert counts((tmp_path / "log").read_text()) == ["0/3", "1/3"]
        bar.close()


def test_the_interval_follows_tqdms_own_setting(clock, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "2")
    out = io.StringIO()
    bar = new_bar(total=6, desc="work", file=out)
    for _ in range(6):
        clock.now += 1
        bar.update(1)
    bar.close()
    assert counts(out.getvalue()) == ["0/6", "2/6", "4/6", "6/6"]
    assert LINE_INTERVAL_S == 30


def test_a_terminal_keeps_the_bar(monkeypatch, tmp_path):
    leader, follower = pty.openpty()
    with open(follower, "w") as terminal, open(tmp_path / "log", "w") as log:
        assert bar_class(terminal) is tqdm
        assert bar_class(log) is LogLines
        read, write = os.pipe()
        with open(write, "w") as pipe:
            assert bar_class(pipe) is LogLines
        os.close(read)
    os.close(leader)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar_class() is LogLines  # stderr when no file is named
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert bar_class() is tqdm  # a notebook draws carriage returns


def test_progress_off_makes_no_bar():
    with progress_bar(False, total=3) as bar:
        assert bar is None


def synth_command(tmp_path, name: str) -> list[str]:
    return [sys.executable, "-m", "satic", "synth", str(tmp_path / name), "--images", "30", "--feature-dim", "6"]


def test_a_command_logs_lines_to_a_file_and_draws_a_bar_on_a_terminal(tmp_path):
    with open(tmp_path / "log", "w+b") as log:
        done = subprocess.run(synth_command(tmp_path, "logged"), stdout=subprocess.DEVNULL, stderr=log,
                              env=traced_env(), timeout=120)
        assert done.returncode == 0
        log.seek(0)
        logged = log.read().decode()
    assert "\r" not in logged
    assert any(line.startswith("synthesising images: 100% 30/30 [") for line in logged.splitlines()), logged
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows of 100 columns
    with subprocess.Popen(synth_command(tmp_path, "drawn"), stdout=subprocess.DEVNULL, stderr=follower,
                          env=traced_env()) as child:
        os.close(follower)
        drawn = b""
        while True:  # read as it writes: a full terminal buffer would stop it
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            drawn += chunk
        os.close(leader)
        assert child.wait(timeout=120) == 0
    assert "\rsynthesising images: 100%|" in drawn.decode(errors="replace")


@pytest.mark.parametrize(("variable", "message"), [
    ("TQDM_MININTERVAL=abc", "environment variable TQDM_MININTERVAL='abc' is not a number of seconds, 0 or more; set "
                             "the seconds between progress lines (e.g. TQDM_MININTERVAL=60), or unset it"),
    ("TQDM_MININTERVAL=nan", "environment variable TQDM_MININTERVAL='nan' is not a number of seconds, 0 or more; set "
                             "the seconds between progress lines (e.g. TQDM_MININTERVAL=60), or unset it"),
    ("TQDM_NCOLS=1.5", "environment variable TQDM_NCOLS='1.5' is not a whole number, which tqdm reads it as; set a "
                       "whole number or unset TQDM_NCOLS"),
    ("TQDM_DELAY=", "environment variable TQDM_DELAY='' is not a number, which tqdm reads it as; set a number or unset "
                    "TQDM_DELAY"),
    ("TQDM_FILE=log.txt", "environment variable TQDM_FILE sets tqdm's file argument for every progress bar, which "
                          "satic sets for each bar itself; unset TQDM_FILE"),
    ("TQDM_INITIAL=5", "environment variable TQDM_INITIAL sets tqdm's initial argument for every progress bar, which "
                       "satic sets for each bar itself; unset TQDM_INITIAL"),
])
def test_a_tqdm_variable_tqdm_cannot_use_is_named(variable, message, monkeypatch, tmp_path, capsys):
    from satic.cli import main

    name, _, value = variable.partition("=")
    monkeypatch.setenv(name, value)
    assert main(["synth", str(tmp_path / "data"), "--images", "5", "--feature-dim", "4"]) == 2
    assert capsys.readouterr().err == f"satic synth: error: {message}\n"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("variable", ["TQDM_MININTERVAL=0", "TQDM_MININTERVAL=0.5", "TQDM_NCOLS=80"])
def test_a_tqdm_variable_tqdm_can_use_is_left_to_it(variable, monkeypatch, tmp_path, capsys):
    from satic.cli import main

    name, _, value = variable.partition("=")
    monkeypatch.setenv(name, value)
    assert main(["synth", str(tmp_path / "data"), "--images", "5", "--feature-dim", "4"]) == 0
    assert "error" not in capsys.readouterr().err and (tmp_path / "data" / "dataset.json").is_file()


def test_a_bad_tqdm_number_is_named_before_tqdm_is_imported(tmp_path):
    env = {**traced_env(), "TQDM_MININTERVAL": "abc", "TQDM_SMOOTHING": "0.5"}
    done = subprocess.run(synth_command(tmp_path, "data"), capture_output=True, text=True, env=env, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("satic synth: error: environment variable TQDM_MININTERVAL='abc' is not a number of "
                           "seconds, 0 or more; set the seconds between progress lines (e.g. TQDM_MININTERVAL=60), or "
                           "unset it\n")
