"""Dynamic batching through the real app: concurrent requests of one model and options are decoded
together and each gets its own captions in order; other options are other batches; a full queue
answers 503; a batch that fails answers 500 to its own requests only."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

from serve_helpers import load, regions, serving, until_cancelled

from satic.captioner import Captioner
from satic.decoding.small_gemm import build_problem


def post_all(client, bodies: list[dict]) -> list:
    """POST every body at once, from as many threads; the responses in the bodies' order."""
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post("/v1/captions", json=body), bodies))


def test_concurrent_requests_are_merged_and_answered_in_order(captioners):
    tiny = captioners["tiny"]
    requests = [regions(np.random.default_rng(i), 2) for i in range(6)]  # 6 requests of 2 images
    with serving({"tiny": tiny}, max_batch=12, max_wait_ms=3000) as client:
        batches = client.app.state.service.batcher.recent_batches
        answers = post_all(client, [{"features": [f.tolist() for f in r]} for r in requests])
        assert [a.status_code for a in answers] == [200] * 6
        assert [n for _, n in batches] == [12]  # one decode for all twelve images (the batch filled up)
        for answer, feats in zip(answers, requests):
            assert answer.json()["captions"] == tiny.caption(feats)  # its own, in order

    with serving({"tiny": tiny}, max_batch=5, max_wait_ms=1000) as small:
        batches = small.app.state.service.batcher.recent_batches  # max_batch cuts; a request is never split
        answers = post_all(small, [{"features": [f.tolist() for f in r]} for r in requests])
    assert [n for _, n in batches] == [4, 4, 4]
    for answer, feats in zip(answers, requests):
        assert answer.json()["captions"] == tiny.caption(feats)


def test_other_options_are_other_batches(captioners):
    feats = regions(np.random.default_rng(7), 1)[0].tolist()
    bodies = [{"features": [feats]}, {"features": [feats], "beam_size": 2}, {"features": [feats]},
              {"features": [feats], "beam_size": 2}]
    with serving({"tiny": captioners["tiny"]}, max_batch=8, max_wait_ms=300) as client:
        batches = client.app.state.service.batcher.recent_batches
        answers = post_all(client, bodies)
    assert [a.status_code for a in answers] == [200] * 4
    assert sorted((options.beam_size, n) for (_, options), n in batches) == [(1, 2), (2, 2)]
    assert answers[1].json()["captions"] == captioners["tiny"].caption([feats], beam_size=2)


def test_a_full_queue_answers_503_with_retry_after(captioners):
    body = {"features": [regions(np.random.default_rng(1), 1)[0].tolist()]}
    with serving({"tiny": captioners["tiny"]}, max_batch=8, max_wait_ms=1000, max_queue=2) as client:
        batcher = client.app.state.service.batcher
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(client.post, "/v1/captions", json=body) for _ in range(2)]
            deadline = time.monotonic() + 10
            while batcher.queued_images < 2:  # both queued, waiting for a batch to fill
                assert time.monotonic() < deadline
                time.sleep(0.005)
            refused = client.post("/v1/captions", json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "queue is full" in refused.json()["error"]
            assert [w.result().status_code for w in waiting] == [200, 200]
        assert client.post("/v1/captions", json=body).status_code == 200


def test_a_failing_batch_fails_only_its_own_requests(tiny_checkpoint):
    broken = load(tiny_checkpoint, "tiny")
    decode = broken.decode

    def failing_beam_search(feats, masks, options):  # a decoding error in every beam-2 batch
        if options.beam_size == 2:
            raise RuntimeError("out of memory")
        return decode(feats, masks, options)

    broken.decode = failing_beam_search
    feats = regions(np.random.default_rng(3), 1)[0].tolist()
    bodies = [{"features": [feats], "beam_size": 2}, {"features": [feats]}, {"features": [feats], "beam_size": 2}]
    with serving({"tiny": broken}, max_batch=8, max_wait_ms=300) as client:
        answers = post_all(client, bodies)
        assert [a.status_code for a in answers] == [500, 200, 500]
        assert answers[0].json() == {"error": "decoding failed: RuntimeError: out of memory"}
        assert answers[1].json()["captions"] == broken.caption([feats])
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/v1/captions", json={"features": [feats]}).status_code == 200


@pytest.mark.parametrize("precision,filled", [("bf16", 8), ("fp32", 6)])
def test_recorded_decoders_decode_batches_at_a_few_sizes(precision, filled, tiny_checkpoint):
    """A recorded decoder (bf16: a TorchScript trace per shape) records each batch shape once, so the server
    fills a batch up to one of a few sizes (and drops the filler's captions); a native one (fp32 on the CPU)
    decodes every size as it comes, so the batch is decoded as it is."""
    from satic.serve.app import decode_batch_size

    tiny = Captioner.load(tiny_checkpoint, precision)
    tiny.name = "tiny"
    assert tiny.records_shapes == (precision == "bf16" or build_problem() is not None)
    if precision == "fp32" and build_problem() is not None:
        filled = 8  # without the kernel, fp32 is recorded as well
    decode, decoded = tiny.decode, []

    def counting(feats, masks, options):
        decoded.append(feats.size(0))
        return decode(feats, masks, options)

    tiny.decode = counting
    requests = [regions(np.random.default_rng(20 + i), 1 + i) for i in range(3)]  # 6 images in all
    with serving({"tiny": tiny}, max_batch=32, max_wait_ms=1000) as client:
        answers = post_all(client, [{"features": [f.tolist() for f in r]} for r in requests])
        assert [n for _, n in client.app.state.service.batcher.recent_batches] == [6]
    assert decoded == [filled]
    tiny.decode = decode
    for answer, feats in zip(answers, requests):  # the filler's captions are not anyone's
        assert len(answer.json()["captions"]) == len(feats)
        if precision == "fp32":  # bf16 rounds differently at other batch sizes
            assert answer.json()["captions"] == tiny.caption(feats)

    sizes = {decode_batch_size(n, 32) for n in range(1, 33)}
    assert sizes == {1, 2, 4, 8, 12, 16, 20, 24, 28, 32}
    assert all(n <= decode_batch_size(n, 32) <= n + 3 for n in range(1, 33))
    assert decode_batch_size(5, 6) == 6 and decode_batch_size(40, 32) == 40  # a request larger than max_batch


# The Batcher on its own, on an event loop of the test's: exact batches, no model.

def run_with(scenario, run_batch=lambda key, items: [f"{key}:{item}" for item in items], timeout=10, **settings):
    """asyncio.run(scenario(batcher)) with a started Batcher; a hang fails after `timeout` seconds."""
    import asyncio

    from satic.serve.batcher import Batcher

    async def main():
        batcher = Batcher(run_batch, **settings)
        batcher.start()
        try:
            return await asyncio.wait_for(scenario(batcher), timeout)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_a_request_larger_than_max_batch_is_a_batch_of_its_own():
    """In a process of its own: a scheduler that never takes the request would spin without yielding."""
    import os
    import subprocess
    import sys

    script = """if True:
        import asyncio
        from satic.serve.batcher import Batcher

        async def main():
            batcher = Batcher(lambda key, items: [f"{key}:{item}" for item in items], max_batch=2, max_wait_s=0.01)
            batcher.start()
            result = await batcher.submit("k", list(range(5)))
            await batcher.close()
            print(result.results, result.batch_images, list(batcher.recent_batches))

        asyncio.run(main())
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.stdout == "['k:0', 'k:1', 'k:2', 'k:3', 'k:4'] 5 [('k', 5)]\n", done.stderr


def test_batches_take_requests_in_arrival_order():
    """A request that does not fit ends the batch: a later, smaller one does not jump ahead of it."""
    import asyncio

    async def scenario(batcher):
        results = await asyncio.gather(batcher.submit("k", ["a1", "a2", "a3"]), batcher.submit("k", ["b1", "b2"]),
                                       batcher.submit("k", ["c1"]))
        return [r.results for r in results], list(batcher.recent_batches)

    answers, batches = run_with(scenario, max_batch=4, max_wait_s=0.05)
    assert answers == [["k:a1", "k:a2", "k:a3"], ["k:b1", "k:b2"], ["k:c1"]]
    assert batches == [("k", 3), ("k", 3)]


def test_the_oldest_requests_key_is_served_first():
    import asyncio

    async def scenario(batcher):
        await asyncio.gather(batcher.submit("a", [1]), batcher.submit("a", [2]), batcher.submit("b", [3]))
        return list(batcher.recent_batches)

    assert run_with(scenario, max_batch=8, max_wait_s=0.05) == [("a", 2), ("b", 1)]


def test_a_full_batch_does_not_wait():
    import time

    async def scenario(batcher):
        start = time.monotonic()
        await batcher.submit("k", [1, 2])
        return time.monotonic() - start

    assert run_with(scenario, max_batch=2, max_wait_s=60) < 5  # not the minute a batch that is not full waits


def test_a_request_that_waited_through_a_running_batch_is_not_made_to_wait_again():
    """The wait is counted from the request's arrival: one that arrived while a batch ran, and has waited
    max_wait by the time that batch ends, starts at once."""
    import asyncio
    import threading
    import time

    release, started = threading.Event(), {}

    def run_batch(key, items):
        started[key] = time.monotonic()
        if key == "first":
            release.wait(10)
        return items

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit("first", [1, 2]))  # full: runs at once, and is held
        while "first" not in started:
            await asyncio.sleep(0.005)
        second = asyncio.ensure_future(batcher.submit("second", [3]))
        await asyncio.sleep(1.1)  # more than max_wait since the second arrived
        released = time.monotonic()
        release.set()
        await asyncio.gather(first, second)
        return started["second"] - released

    assert run_with(scenario, run_batch=run_batch, max_batch=2, max_wait_s=1.0) < 0.7  # not max_wait more


def test_a_batch_with_too_few_results_fails_its_requests():
    import asyncio

    async def scenario(batcher):
        results = await asyncio.gather(batcher.submit("k", [1, 2]), batcher.submit("k", [3]), return_exceptions=True)
        return [type(r).__name__ + ": " + str(r) for r in results]

    said = "BatchFailed: RuntimeError: the batch gave 2 results for 3 images"
    assert run_with(scenario, run_batch=lambda key, items: items[:-1], max_batch=4, max_wait_s=0.05) == [said, said]


def test_closing_fails_the_requests_still_queued():
    import asyncio

    from satic.serve.batcher import Batcher, BatchFailed

    async def main():
        batcher = Batcher(lambda key, items: items, max_batch=8, max_wait_s=60)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit("k", [1]))
        while batcher.queued_images < 1:
            await asyncio.sleep(0.005)
        await batcher.close()
        with pytest.raises(BatchFailed, match="the server is shutting down"):
            await asyncio.wait_for(waiting, 10)
        assert batcher.queued_images == 0

    asyncio.run(main())


def test_a_cancelled_request_is_not_decoded():
    import asyncio

    async def scenario(batcher):
        gone = asyncio.ensure_future(batcher.submit("k", [1, 2]))
        while batcher.queued_images < 2:
            await asyncio.sleep(0.005)
        gone.cancel()  # its client disconnected
        result = await batcher.submit("k", [3])
        return result.results, list(batcher.recent_batches)

    assert run_with(scenario, max_batch=8, max_wait_s=0.1) == (["k:3"], [("k", 1)])


def test_draining_decodes_the_queue_at_once_and_closing_refuses_what_comes_after():
    """The server stops: a request waiting max_wait_s (60 s) for company is decoded at once, and a request
    submitted once the batcher is closed is refused as ShuttingDown (a 503), not queued for nobody."""
    import asyncio

    from satic.serve.batcher import Batcher, ShuttingDown

    async def main():
        batcher = Batcher(lambda key, items: items, max_batch=8, max_wait_s=60)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit("k", [1, 2]))
        while batcher.queued_images < 2:
            await asyncio.sleep(0.005)
        batcher.drain()
        assert (await asyncio.wait_for(waiting, 10)).results == [1, 2]
        await batcher.close()
        with pytest.raises(ShuttingDown, match="the server is shutting down"):
            await batcher.submit("k", [3])

    asyncio.run(main())


def test_a_cancelled_request_leaves_the_queue_at_once():
    """Its images stop counting against max_queue, and the batch that waited for it does not wait on."""
    import asyncio

    from satic.serve.batcher import Batcher

    async def main():
        batcher = Batcher(lambda key, items: items, max_batch=8, max_wait_s=60, max_queue=2)
        batcher.start()
        gone = asyncio.ensure_future(batcher.submit("k", [1, 2]))
        while batcher.queued_images < 2:
            await asyncio.sleep(0.005)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.queued_images == 0
        batcher.drain()  # no company to wait for
        assert (await asyncio.wait_for(batcher.submit("k", [3, 4]), 10)).results == [3, 4]
        assert list(batcher.recent_batches) == [("k", 2)]
        await batcher.close()

    asyncio.run(main())


def test_a_request_submitted_after_abandon_is_refused_as_shutting_down():
    """A request whose body was still being read at a second signal reaches the queue after abandon(): it gets
    ShuttingDown (a 503, as the requests abandoned with it), not BatchFailed (a 500), and nothing more is decoded."""
    import asyncio

    from satic.serve.batcher import Batcher, ShuttingDown

    decoded = []

    def run_batch(key, items):
        time.sleep(0.2)  # the abandoned wait, not the thread, ends first
        decoded.extend(items)
        return items

    async def main():
        batcher = Batcher(run_batch, max_batch=8, max_wait_s=60)
        batcher.start()
        batcher.abandon()
        await asyncio.sleep(0.01)  # abandon() answers the waiting requests on the loop
        with pytest.raises(ShuttingDown, match="told to stop at once"):  # not BatchFailed, its parent
            await asyncio.wait_for(batcher.submit("k", [1]), 10)
        await batcher.close()

    asyncio.run(main())
    assert decoded == []


def test_work_given_to_the_worker_after_abandon_never_runs():
    """An upload whose images reach the worker thread after a second signal gets ShuttingDown at once and its images
    are not read: an idle thread would start on them before they could be cancelled."""
    import asyncio

    from satic.serve.batcher import Batcher, ShuttingDown

    ran = []

    async def main():
        batcher = Batcher(lambda key, items: items, max_batch=8, max_wait_s=60)
        batcher.start()
        batcher.abandon()
        await asyncio.sleep(0.01)  # abandon() answers the waiting requests on the loop
        with pytest.raises(ShuttingDown, match="told to stop at once"):
            await batcher.in_worker(ran.append, "read")
        await batcher.close()

    asyncio.run(main())
    assert ran == []


def test_unless_cancels_whichever_of_the_two_did_not_end_first():
    """The work's result when it ends first (the stop is cancelled: no task is left behind); the work cancelled
    when the stop ends first."""
    from satic.serve.batcher import unless

    cancelled = []

    async def main():
        done = await unless(asyncio.sleep(0, result="work"), until_cancelled(cancelled, "stop"))
        await asyncio.sleep(0)  # the stop's cancellation unwinds
        first = done.result(), list(cancelled)
        stopped = await unless(until_cancelled(cancelled, "work"), asyncio.sleep(0))
        await asyncio.sleep(0)
        return first, stopped.cancelled(), cancelled

    assert asyncio.run(main()) == (("work", ["stop"]), True, ["stop", "work"])


def test_closing_leaves_no_task_on_the_loop():
    """Neither the scheduling task nor the waits of finished work outlive close()."""
    from satic.serve.batcher import Batcher

    async def main():
        batcher = Batcher(lambda key, items: items, max_batch=8, max_wait_s=0.01)
        batcher.start()
        assert (await batcher.submit("k", [1])).results == [1]
        assert await batcher.in_worker(sum, [1, 2]) == 3
        await batcher.close()
        return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    assert asyncio.run(main()) == []


def held_batches():
    """A run_batch that holds each batch on the worker thread until `release` is set, then notes its key in `ran`:
    (release, ran, run_batch)."""
    release, ran = threading.Event(), []

    def run_batch(key, items):
        release.wait(10)
        ran.append(key)
        return items

    return release, ran, run_batch


def test_abandon_answers_the_running_batch_the_queue_and_waiting_work_at_once():
    """A second signal while a batch decodes: its requests, those queued behind it and work waiting for the worker
    thread all get ShuttingDown without waiting for the thread; the queue empties and the waiting work never runs."""
    from satic.serve.batcher import Batcher

    release, ran, run_batch = held_batches()

    async def scenario():
        batcher = Batcher(run_batch, max_batch=2, max_wait_s=60)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("full", [1, 2]))  # a full batch: starts at once, and is held
        while not batcher.busy:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(batcher.submit("k", [3]))
        work = asyncio.ensure_future(batcher.in_worker(ran.append, "work"))
        while batcher.queued_images < 1:
            await asyncio.sleep(0.005)
        batcher.abandon()
        outcomes = await asyncio.wait_for(asyncio.gather(running, queued, work, return_exceptions=True), 5)
        await asyncio.sleep(0.05)
        left = batcher.queued_images, list(batcher.recent_batches)
        release.set()
        while batcher.busy:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        await batcher.close()
        return [f"{type(o).__name__}: {o}" for o in outcomes], left

    async def main():
        return await asyncio.wait_for(scenario(), 10)

    said = "ShuttingDown: the server was told to stop at once"
    assert asyncio.run(main()) == ([said] * 3, (0, [("full", 2)]))
    assert ran == ["full"]


def test_closing_cancels_work_still_waiting_for_the_worker_thread():
    """close() does not wait for a running batch, but work queued behind it for the thread never runs."""
    from satic.serve.batcher import Batcher, ShuttingDown

    release, ran, run_batch = held_batches()

    async def main():
        batcher = Batcher(run_batch, max_batch=1, max_wait_s=60)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("full", [1]))
        while not batcher.busy:
            await asyncio.sleep(0.005)
        work = asyncio.ensure_future(batcher.in_worker(ran.append, "work"))
        await asyncio.sleep(0.01)
        start = time.monotonic()
        await batcher.close()
        assert time.monotonic() - start < 5  # the running batch is not waited for
        release.set()
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(work, 5)
        while batcher.busy:
            await asyncio.sleep(0.005)
        running.cancel()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert ran == ["full"]


@pytest.mark.parametrize("settings", [{"max_batch": 0}, {"max_queue": 0}, {"max_wait_s": -0.001}],
                         ids=["max_batch", "max_queue", "max_wait_s"])
def test_settings_below_their_least_are_refused(settings):
    from satic.serve.batcher import Batcher

    with pytest.raises(ValueError, match="max_batch and max_queue must be >= 1 and max_wait_s >= 0"):
        Batcher(lambda key, items: items, **settings)


def test_the_least_settings_are_served():
    """max_batch 1, max_queue 1 and max_wait_s 0: one image at a time, decoded without waiting."""
    from satic.serve.batcher import Batcher, QueueFull

    async def main():
        batcher = Batcher(lambda key, items: items, max_batch=1, max_wait_s=0, max_queue=1)
        batcher.start()
        try:
            with pytest.raises(QueueFull, match=r"the queue is full \(0 of 1 images waiting\)"):
                await batcher.submit("k", [1, 2])
            return [(await batcher.submit("k", [i])).results for i in range(3)], list(batcher.recent_batches)
        finally:
            await batcher.close()

    assert asyncio.run(main()) == ([[0], [1], [2]], [("k", 1)] * 3)


def test_stopping_before_the_start_or_after_the_loop_has_ended_is_harmless():
    """A signal may come before the server has started its loop or after the loop has closed."""
    from satic.serve.batcher import Batcher

    early = Batcher(lambda key, items: items)
    early.drain()
    early.abandon()

    async def submit_before_start():
        with pytest.raises(RuntimeError, match=r"Batcher.start\(\) was not called"):
            await early.submit("k", [1])

    asyncio.run(submit_before_start())

    late = Batcher(lambda key, items: items, max_wait_s=0)

    async def main():
        late.start()
        result = (await late.submit("k", [1])).results
        await late.close()
        return result

    assert asyncio.run(main()) == [1]
    late.drain()
    late.abandon()


def test_busy_says_whether_a_batch_is_on_the_worker_thread():
    gate = threading.Event()

    def run_batch(key, items):
        gate.wait(10)
        return items

    async def scenario(batcher):
        seen = [batcher.busy]
        for i in range(2):
            gate.clear()
            running = asyncio.ensure_future(batcher.submit("k", [i]))
            while not batcher.busy:
                await asyncio.sleep(0.005)
            seen.append(batcher.busy)
            gate.set()
            await running
            while batcher.busy:
                await asyncio.sleep(0.005)
            seen.append(batcher.busy)
        return seen

    assert run_with(scenario, run_batch=run_batch, max_batch=1, max_wait_s=0) == [False, True, False, True, False]


def test_a_batch_reports_its_images_and_its_decoding_time():
    heard = []

    def run_batch(key, items):
        time.sleep(0.05)
        return items

    async def scenario(batcher):
        return await batcher.submit("k", [1, 2])

    done = run_with(scenario, run_batch=run_batch, max_batch=2, max_wait_s=0,
                    on_batch=lambda *args: heard.append(args))
    assert done.results == [1, 2] and done.batch_images == 2 and 0.05 <= done.batch_seconds < 5
    assert heard == [("k", 2, done.batch_seconds)]


def test_a_failed_batch_is_not_reported_as_decoded():
    """on_batch (the metrics' batch count and time) hears of the batches that succeeded only."""
    heard = []

    def run_batch(key, items):
        if key == "bad":
            raise RuntimeError("out of memory")
        return items

    async def scenario(batcher):
        failed = await asyncio.gather(batcher.submit("bad", [1]), return_exceptions=True)
        return [type(e).__name__ for e in failed], (await batcher.submit("good", [2])).results

    assert run_with(scenario, run_batch=run_batch, max_batch=1, max_wait_s=0,
                    on_batch=lambda key, images, seconds: heard.append((key, images))) == (["BatchFailed"], [2])
    assert heard == [("good", 1)]


def test_a_full_batch_behind_the_oldest_request_starts_at_once_when_that_client_leaves():
    """The oldest request's key is served first, so a full batch of another key waits behind it; once the oldest
    request's client has gone, the scheduler stops waiting on its behalf and does not make the full batch wait out
    the departed request's max_wait_s."""
    async def scenario(batcher):
        gone = asyncio.ensure_future(batcher.submit("a", [1]))
        while batcher.queued_images < 1:
            await asyncio.sleep(0.005)
        full = asyncio.ensure_future(batcher.submit("b", [2, 3]))
        while batcher.queued_images < 3:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        waiting = list(batcher.recent_batches)
        gone.cancel()
        start = time.monotonic()
        result = await full
        return waiting, gone.cancelled(), result.results, time.monotonic() - start

    waiting, cancelled, results, waited = run_with(scenario, max_batch=2, max_wait_s=30, timeout=20)
    assert waiting == [] and cancelled and results == ["b:2", "b:3"] and waited < 5
