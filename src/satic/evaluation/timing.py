"""Timing a call: the one way satic measures speed (`satic eval`, the demo, the benchmarks).

One-time work is never timed: every call first runs `warm_up` times untimed (that traces a decoding
step for each new shape, builds GPU kernels, makes the first allocations). GPU work is drained
before and after each timed call. Calls compared with each other are timed interleaved (pass 1 of
each, then pass 2 of each, ...), so a slow spell of a shared machine hits all of them alike. A
`Timing` keeps every pass and says which statistic it reports and how many CPU threads ran.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

STATISTICS: dict[str, Callable] = {"best": min, "median": statistics.median, "mean": statistics.fmean}


@dataclass(frozen=True)
class Timing:
    seconds: tuple[float, ...]  # wall seconds of each timed pass
    cpu_seconds: tuple[float, ...]  # this process's CPU seconds of each pass (wall less the time others held the CPU)
    statistic: str  # best, median or mean of the passes: what `value` reports
    warm_up: int  # untimed calls before the first timed one
    threads: int  # torch's CPU threads while timing
    output: Any = field(default=None, repr=False, compare=False)  # what the last call returned

    @property
    def value(self) -> float:
        """Seconds per call, by `statistic`."""
        return STATISTICS[self.statistic](self.seconds)

    @property
    def cpu_value(self) -> float:
        return STATISTICS[self.statistic](self.cpu_seconds)

    def describe(self) -> str:
        """E.g. 'best of 3 passes after 1 untimed, 1 CPU thread'."""
        passes = len(self.seconds)
        return (f"{self.statistic} of {passes} pass{'es' * (passes != 1)} after {self.warm_up} untimed, "
                f"{self.threads} CPU thread{'s' * (self.threads != 1)}")


def sync(device: torch.device | str | None) -> None:
    """GPU work is asynchronous: wait for it before reading the clock."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside the block (None or 0: unchanged)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_calls(calls: Mapping[str, Callable[[], Any]], passes: int = 3, warm_up: int = 1, statistic: str = "best",
               device: torch.device | str | None = None) -> dict[str, Timing]:
    """{name: Timing} of calls {name: fn}: every fn `warm_up` times untimed, then `passes` timed passes,
    interleaved over the calls."""
    if passes < 1 or warm_up < 0:
        raise ValueError(f"need passes >= 1 and warm_up >= 0, got {passes} and {warm_up}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    outputs = {name: None for name in calls}
    for name, fn in calls.items():
        for _ in range(warm_up):
            outputs[name] = fn()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(passes):
        for name, fn in calls.items():
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    threads = torch.get_num_threads()
    return {name: Timing(tuple(wall[name]), tuple(cpu[name]), statistic, warm_up, threads, outputs[name])
            for name in calls}


def time_call(fn: Callable[[], Any], passes: int = 3, warm_up: int = 1, statistic: str = "best",
              device: torch.device | str | None = None) -> Timing:
    """The Timing of one call (see time_calls)."""
    return time_calls({"call": fn}, passes, warm_up, statistic, device)["call"]
