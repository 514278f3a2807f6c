"""Progress on long work: a tqdm bar on a terminal, a plain line now and then in a log.

A bar redraws itself about ten times a second with carriage returns. Sent to a file or a pipe (a run under
nohup, a batch scheduler, a container's log) that is ten joined bar updates a second, which a person cannot
read and `grep` treats as one line. So where the bar's stream is not a terminal, `progress_bar` writes whole
lines instead: one as the work starts, one every `LINE_INTERVAL_S` seconds (tqdm's own TQDM_MININTERVAL sets
another), and one as it ends. A Jupyter kernel's stream is not a terminal but draws carriage returns, so it
keeps the bar.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, Any

from tqdm import tqdm

from satic.io import deferred_interrupts

LINE_INTERVAL_S = 30.0


class LogLines(tqdm):
    """A tqdm whose every display is a whole line: no bar, no carriage returns, nothing cleared. A line is
    written only when the count has moved since the last one, so tqdm.write's redraw after a message adds
    nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        interval = float(os.environ.get("TQDM_MININTERVAL", LINE_INTERVAL_S))
        kwargs.update(mininterval=interval, maxinterval=max(interval, 10.0), miniters=1, dynamic_ncols=False)
        self._shown: float | None = None  # the count of the last line written
        super().__init__(*args, **kwargs)

    def __str__(self) -> str:
        return self.format_meter(**{**self.format_dict, "ncols": 0})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None or self.n == self._shown:
            return False  # a clear (msg "") or a redraw with nothing new
        self._shown = self.n
        self.fp.write(f"{self}\n")
        getattr(self.fp, "flush", lambda: None)()
        return True

    def clear(self, nolock: bool = False) -> None:
        pass  # lines already written stay

    def close(self) -> None:
        if not self.disable:
            self._ema_dt = lambda: None  # the last line's rate is the whole run's, as tqdm's last bar
            self.display()  # the last count, unless its line was written
            self.leave = False  # tqdm's own close would write the line again
        super().close()


def bar_class(file: IO | None = None) -> type[tqdm]:
    """tqdm where `file` (stderr when None) shows a bar, else LogLines."""
    stream = sys.stderr if file is None else file
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    return tqdm if terminal or "ipykernel" in sys.modules else LogLines


def new_bar(*args: Any, **kwargs: Any) -> tqdm:
    """tqdm(*args, **kwargs) as a bar or as lines, whichever its stream shows (see bar_class). Ctrl-C and SIGTERM
    wait until the bar is whole: the first bar imports multiprocessing for tqdm's lock, and a bar stopped there, half
    made, would print an "Exception ignored" traceback as it is collected (its close reads attributes it never got)."""
    with deferred_interrupts():
        return bar_class(kwargs.get("file"))(*args, **kwargs)


def progress_bar(progress: bool, **kwargs: Any) -> tqdm | contextlib.nullcontext:
    """new_bar(**kwargs), or None (as a context) with progress off: even a disabled tqdm makes its
    multiprocessing lock, which fixes the process's start method, so that the host's own
    set_start_method('spawn') would fail."""
    return new_bar(**kwargs) if progress else contextlib.nullcontext()
