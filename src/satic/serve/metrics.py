"""What the server has done, for GET /metrics in the Prometheus text format (no client library needed).

Counters and histograms are updated on the event loop (requests) and the worker thread (batches), so
every update and the rendering hold one lock. Histograms are cumulative, as Prometheus expects: each
`le` bucket counts the observations at or below its bound.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from typing import Callable

# seconds: a small model's lone caption takes ~1 ms on a CPU, a paper-size beam search on a busy
# server seconds
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images in one decoded batch


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*map(_number, self.bounds), "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{bound}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {_number(self.sum)}", f"{name}_count{braces} {running}"]


class ServeMetrics:
    """Requests to POST /v1/captions by status, their durations and images per model, and the decoded
    batches per model (images and seconds); the queue's length and whether the worker is busy are read
    when rendering."""

    def __init__(self, queued_images: Callable[[], int] = lambda: 0, busy: Callable[[], bool] = lambda: False):
        self.queued_images = queued_images
        self.busy = busy
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests: dict[str, int] = defaultdict(int)  # status -> count
        self._images: dict[str, int] = defaultdict(int)  # model -> images captioned
        self._durations: dict[str, Histogram] = {}  # model -> seconds per answered request
        self._batch_images: dict[str, Histogram] = {}
        self._batch_seconds: dict[str, Histogram] = {}
        self._connection_timeouts = {"header": 0, "send": 0}

    def request(self, status: int, seconds: float, model: str | None = None, images: int = 0) -> None:
        """One answered request; model and images only for a request that got its captions."""
        with self._lock:
            self._requests[str(status)] += 1
            if model is not None:
                self._images[model] += images
                self._durations.setdefault(model, Histogram(DURATION_BUCKETS)).observe(seconds)

    def batch(self, model: str, images: int, seconds: float) -> None:
        with self._lock:
            self._batch_images.setdefault(model, Histogram(BATCH_BUCKETS)).observe(images)
            self._batch_seconds.setdefault(model, Histogram(DURATION_BUCKETS)).observe(seconds)

    def connection_timeout(self, kind: str) -> None:
        """One connection closed by --header-timeout ("header") or --send-timeout ("send")."""
        with self._lock:
            self._connection_timeouts[kind] += 1

    def render(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        with self._lock:
            family("satic_requests_total", "counter", "Caption requests answered, by HTTP status.")
            lines += [f'satic_requests_total{{status="{s}"}} {n}' for s, n in sorted(self._requests.items())]
            family("satic_images_total", "counter", "Images captioned, by model.")
            lines += [f"satic_images_total{{{_label(m)}}} {n}" for m, n in sorted(self._images.items())]
            for name, kind, text, table in (
                ("satic_request_duration_seconds", "histogram",
                 "Seconds from receiving a caption request to answering it, queueing included, by model.",
                 self._durations),
                ("satic_batch_images", "histogram", "Images in each decoded batch, by model.", self._batch_images),
                ("satic_batch_duration_seconds", "histogram", "Seconds the worker spent on each batch, by model.",
                 self._batch_seconds)):
                family(name, kind, text)
                for model, histogram in sorted(table.items()):
                    lines += histogram.lines(name, _label(model))
            family("satic_connection_timeouts_total", "counter",
                   "Connections closed because a request's headers took longer than --header-timeout (header), or "
                   "their client read none of its answers for --send-timeout (send).")
            lines += [f'satic_connection_timeouts_total{{kind="{k}"}} {n}'
                      for k, n in sorted(self._connection_timeouts.items())]
        family("satic_queue_images", "gauge", "Images waiting to be decoded.")
        lines.append(f"satic_queue_images {self.queued_images()}")
        family("satic_worker_busy", "gauge", "Whether the worker thread is decoding a batch or extracting features.")
        lines.append(f"satic_worker_busy {int(self.busy())}")
        family("satic_start_time_seconds", "gauge", "When the server started, in seconds since the Unix epoch.")
        lines.append(f"satic_start_time_seconds {_number(self.started)}")
        return "\n".join(lines) + "\n"


def _label(model: str) -> str:
    escaped = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'model="{escaped}"'


def _number(value: float) -> str:
    return repr(float(value))  # as the Prometheus client libraries write floats: 0.005, 10.0, 1733400000.25
