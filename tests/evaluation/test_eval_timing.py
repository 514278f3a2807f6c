"""The one timing helper: one-time work (the first call) is not timed, calls are interleaved, and the
result says what it reports."""
import time

import pytest
import torch

from satic.evaluation.timing import Timing, time_call, time_calls, torch_threads


def slow_first_call(first: float, later: float):
    calls = []

    def fn():
        time.sleep(first if not calls else later)
        calls.append(len(calls))
        return len(calls)

    return fn, calls


def test_the_slow_first_call_is_not_timed():
    fn, calls = slow_first_call(first=0.5, later=0.01)
    timing = time_call(fn, passes=3)
    assert len(calls) == 4 and len(timing.seconds) == 3 and timing.warm_up == 1
    assert all(0.01 <= s < 0.25 for s in timing.seconds)  # none of them is the 0.5 s call
    assert timing.value == min(timing.seconds) and timing.output == 4
    assert timing.cpu_value < timing.value  # sleeping holds no CPU
    untimed_excluded = time_call(slow_first_call(first=0.5, later=0.01)[0], passes=1, warm_up=0)
    assert untimed_excluded.value >= 0.5  # without a warm-up the first call is what gets timed


def test_calls_are_interleaved_after_every_warm_up():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    timings = time_calls(calls, passes=2, warm_up=1)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert set(timings) == {"a", "b"} and all(len(t.seconds) == 2 for t in timings.values())


def test_statistics_and_description():
    timing = Timing(seconds=(3.0, 1.0, 2.0, 10.0), cpu_seconds=(1.0,) * 4, statistic="median", warm_up=1, threads=1)
    assert timing.value == 2.5
    assert Timing((3.0, 1.0), (1.0, 1.0), "mean", 0, 2).value == 2.0
    assert timing.describe() == "median of 4 passes after 1 untimed, 1 CPU thread"
    assert time_call(lambda: None, passes=1, statistic="best").describe().startswith("best of 1 pass after 1 untimed")
    with pytest.raises(ValueError, match="statistic"):
        time_call(lambda: None, statistic="fastest")
    with pytest.raises(ValueError, match="passes"):
        time_call(lambda: None, passes=0)


def test_threads_are_set_inside_and_restored():
    before = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
        assert time_call(lambda: None, passes=1).threads == 2
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_zero_threads_leave_torchs_setting_alone():
    before = torch.get_num_threads()
    with torch_threads(0):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_a_negative_warm_up_is_refused():
    with pytest.raises(ValueError, match="need passes >= 1 and warm_up >= 0, got 1 and -1"):
        time_call(lambda: None, passes=1, warm_up=-1)


def test_a_cpu_device_is_timed_without_a_gpu_sync():
    timing = time_call(lambda: 7, passes=2, device="cpu")
    assert len(timing.seconds) == 2 and timing.output == 7


def test_by_default_a_call_is_timed_best_of_3_passes_after_1_untimed():
    counts = {"a": 0, "b": 0}

    def count(name):
        counts[name] += 1

    timings = time_calls({name: (lambda name=name: count(name)) for name in counts})
    single = time_call(lambda: count("a"))
    assert counts == {"a": 8, "b": 4}
    for timing in (*timings.values(), single):
        assert timing.describe().startswith("best of 3 passes after 1 untimed, ")
        assert len(timing.seconds) == len(timing.cpu_seconds) == 3


def test_the_calls_output_is_kept_but_neither_shown_nor_compared():
    """A timed decode's output (every caption) stays out of a Timing's repr, and out of equality (tensors)."""
    timings = [Timing((1.0, 2.0), (0.5, 0.5), "best", 1, 1, output=torch.full((3,), value)) for value in (0, 1)]
    assert timings[0] == timings[1] and torch.equal(timings[1].output, torch.ones(3))
    assert repr(timings[0]) == ("Timing(seconds=(1.0, 2.0), cpu_seconds=(0.5, 0.5), statistic='best', warm_up=1, "
                                "threads=1)")
