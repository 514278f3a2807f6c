"""`satic serve` as a real process on a loopback port: /health, the reference fixture's captions, 32
concurrent requests each answered with its own captions, and SIGTERM while a request is in flight (that
request is answered, then the process exits 0); a batch that outlives --shutdown-timeout is abandoned; clients that
trickle their body, read no answer or leave early hold neither a request nor the exit, and their images are not
decoded; connections that send no complete request, or read none of their answers, are closed in time."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from satic.cli import main as satic_main
from satic.data.vocab import Vocabulary
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import save_checkpoint

from serve_helpers import WORDS, regions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(*args: str, open_files: tuple[int, int] | None = None):
    """`satic serve ARGS` on a free loopback port, answering /health: (the process, its URL, /health's answer);
    killed at the end if it is still running. open_files: its (soft, hard) limit of open files."""
    import httpx2

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    limit = None if open_files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files)
    server = subprocess.Popen([sys.executable, "-m", "satic", "serve", *args, "--port", str(port), "--threads", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not answer within 60 s"
            try:
                health = httpx2.get(f"{url}/health", timeout=1)
                break
            except httpx2.TransportError:
                time.sleep(0.1)
        yield server, url, health
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_process_answers_and_stops_cleanly_on_sigterm(tiny_checkpoint, captioners, fixture_k2,
                                                            reference_fixture):
    import httpx2

    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--checkpoint", f"ref-k2={fixture_k2}",
                       "--max-wait-ms", "1500") as (server, url, health):
        assert health.json() == {"status": "ok", "models": ["tiny", "ref-k2"]}
        expected = json.loads((reference_fixture / "expected.json").read_text())["2"]
        with np.load(reference_fixture / "features.npz") as stored:
            six = [stored[f"att_{i}"].tolist() for i in range(6)]
        answer = httpx2.post(f"{url}/v1/captions", json={"features": six, "model": "ref-k2"}, timeout=60)
        assert answer.json()["captions"] == [e["caption"] for e in expected["greedy_batched"]]
        rng = np.random.default_rng(7)
        requests = [regions(rng, 1 + i % 3) for i in range(32)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda f: httpx2.post(f"{url}/v1/captions",
                                                          json={"features": [x.tolist() for x in f]},
                                                          timeout=60), requests))
        assert [a.status_code for a in answers] == [200] * 32
        assert [a.json()["captions"] for a in answers] == [captioners["tiny"].caption(f) for f in requests]
        feats = regions(np.random.default_rng(5), 3)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # a lone request waits --max-wait-ms (1.5 s) for company: SIGTERM arrives meanwhile
            in_flight = pool.submit(httpx2.post, f"{url}/v1/captions", json={"features": [f.tolist() for f in feats]},
                                    timeout=30)
            time.sleep(0.5)
            assert not in_flight.done()
            server.send_signal(signal.SIGTERM)
            answer = in_flight.result()
        assert answer.status_code == 200
        assert answer.json()["captions"] == captioners["tiny"].caption(feats)
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        assert "Traceback" not in err


def big_checkpoint(path):
    """A 4-layer, 384-wide model: 32 images of 1024 regions take it ~25 s on one thread."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(WORDS), group_size=2, num_layers=4, d_model=384, d_ff=1536, num_heads=8,
                         att_feat_size=8, max_positions=64)
    return save_checkpoint(path, SATModel(config), Vocabulary(WORDS))


def huge_request(images: int) -> dict:
    rng = np.random.default_rng(0)
    return {"features": [rng.standard_normal((1024, 8)).round(3).tolist() for _ in range(images)]}


def metric_lines(url: str) -> list[str]:
    import httpx2

    return httpx2.get(f"{url}/metrics", timeout=10).text.splitlines()


@pytest.mark.parametrize("signals, timeout, said", [
    (["SIGTERM"], "0.5", "a batch still decoding after --shutdown-timeout 0.5 s was abandoned"),
    (["SIGTERM", "SIGINT"], "60", "a batch still decoding at a second signal was abandoned"),
    (["SIGINT"], "0.5", "a batch still decoding after --shutdown-timeout 0.5 s was abandoned"),
], ids=["shutdown-timeout", "second-signal", "ctrl-c"])
def test_a_batch_that_outlives_the_shutdown_is_abandoned(tmp_path, signals, timeout, said):
    """SIGTERM during a batch of ~25 s (32 images of 1024 regions through a 4-layer, 384-wide model on one
    thread; ~0.6 GB) with --shutdown-timeout 0.5, or SIGTERM then Ctrl-C (a forced stop) with 60 s: the process
    exits 0 within seconds, saying so, without waiting for the batch nor writing a traceback; the request being
    decoded and the one queued behind it are refused with 503 (or their connections close with the process)."""
    import httpx2

    big = big_checkpoint(tmp_path / "big")
    huge = huge_request(32)

    def post(body):
        try:
            return httpx2.post(f"{url}/v1/captions", json=body, timeout=120)
        except httpx2.TransportError:  # the connection closed with the process
            return None

    with serve_process("--checkpoint", f"big={big}", "--max-wait-ms", "0", "--shutdown-timeout", timeout) as (
            server, url, _):
        deadline = time.monotonic() + 60
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(post, huge)]
            while "satic_worker_busy 1" not in httpx2.get(f"{url}/metrics", timeout=10).text.splitlines():
                assert time.monotonic() < deadline and not in_flight[0].done(), "the batch never started"
                time.sleep(0.1)
            in_flight.append(pool.submit(post, {"features": [[[1.0] * 8]]}))
            while "satic_queue_images 1" not in httpx2.get(f"{url}/metrics", timeout=10).text.splitlines():
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.1)
            err, took = stop_server(server, signals, 0.5)
            answers = [f.result() for f in in_flight]
        assert server.returncode == (130 if signals[0] == "SIGINT" else 0), err
        assert took < 10, f"the server took {took:.1f} s to stop"
        assert said in err
        assert "Traceback" not in err and "CancelledError" not in err, err
        for answer in answers:
            assert (answer is None and len(signals) == 1) or (
                answer.status_code == 503 and "send the request again" in answer.json()["error"]), answer


def test_sigterm_decodes_the_requests_waiting_for_company_at_once(tiny_checkpoint, captioners):
    """Requests waiting --max-wait-ms (60 s) for others to join their batch when SIGTERM comes are decoded
    at once: each gets its captions, and the process exits 0 in seconds, not after the wait."""
    import httpx2

    rng = np.random.default_rng(3)
    requests = [regions(rng, 1 + i % 2) for i in range(6)]
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--max-wait-ms", "60000",
                       "--shutdown-timeout", "120") as (server, url, _):
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = [pool.submit(httpx2.post, f"{url}/v1/captions", json={"features": [x.tolist() for x in f]},
                                   timeout=30) for f in requests]
            deadline = time.monotonic() + 30
            while "satic_queue_images 9" not in httpx2.get(f"{url}/metrics", timeout=10).text.splitlines():
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.1)
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            answers = [a.result() for a in answers]
            _, err = server.communicate(timeout=60)
            took = time.monotonic() - signalled
        assert [a.status_code for a in answers] == [200] * len(requests), [a.text for a in answers]
        assert [a.json()["captions"] for a in answers] == [captioners["tiny"].caption(f) for f in requests]
        assert server.returncode == 0 and "Traceback" not in err, err
        assert took < 15, f"the server took {took:.1f} s to stop"


def test_a_client_that_leaves_mid_upload_is_counted_not_logged_as_a_failure(tiny_checkpoint):
    import httpx2

    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}") as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        head = ("POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Content-Length: 300000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
                "filename=\"a.png\"\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b"\x89PNG" + b"\0" * 50_000)  # then goes away
        deadline = time.monotonic() + 30
        while 'satic_requests_total{status="499"} 1' not in httpx2.get(f"{url}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, httpx2.get(f"{url}/metrics", timeout=10).text
            time.sleep(0.1)
        assert httpx2.get(f"{url}/health", timeout=10).status_code == 200
        malformed = httpx2.post(f"{url}/v1/captions", content=b"not a multipart body",
                                headers={"content-type": "multipart/form-data; boundary=b"}, timeout=10)
        assert malformed.status_code == 400 and "multipart body" in malformed.json()["error"], malformed.text
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err and "ClientDisconnect" not in err, err
    assert "boundary" not in err, err  # the parser's own line about the malformed body: the client has its 400


def stop_server(server: subprocess.Popen, signals: list[str], pause: float) -> tuple[str, float]:
    """Send the server `signals` (names), `pause` seconds apart, and wait for it to exit -> (its stderr, seconds from
    the first signal to its exit)."""
    signalled = time.monotonic()
    for name in signals:
        server.send_signal(getattr(signal, name))
        time.sleep(pause)
    _, err = server.communicate(timeout=60)
    return err, time.monotonic() - signalled


def post_and_close(url: str, body: bytes, linger: float = 0.0) -> None:
    """A client that sends a whole captioning request, waits `linger` seconds, and closes without reading the answer."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(linger)


def test_clients_that_leave_while_queued_are_counted_as_gone_and_not_decoded(tiny_checkpoint):
    """Three clients send their features and close the connection while the requests wait --max-wait-ms for
    company: each is counted as 499, none as captioned, and no batch decodes their images."""
    import httpx2

    body = json.dumps({"features": [[[1.0] * 8]]}).encode()
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--max-wait-ms", "3000") as (server, url, _):
        for _ in range(3):
            post_and_close(url, body, 0.2)
        time.sleep(4)  # past --max-wait-ms
        metrics = httpx2.get(f"{url}/metrics", timeout=10).text.splitlines()
        assert 'satic_requests_total{status="499"} 3' in metrics, metrics
        assert not [line for line in metrics if line.startswith(("satic_images_total{", "satic_batch_images_count"))]
        assert "satic_queue_images 0" in metrics
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err


def test_clients_gone_before_their_request_is_queued_have_no_images_decoded(tiny_checkpoint):
    """With --max-wait-ms 0 an idle worker starts a batch as soon as a request is queued: 20 clients that send their
    features and close the connection at once are found gone before their requests are queued, and their images
    are not decoded (every one was, before). A client whose close the server has not yet read when it queues the
    request can still be decoded: on a loaded machine about half of them are, so only all 20 fails."""
    body = json.dumps({"features": [[[1.0] * 8]]}).encode()
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--max-wait-ms", "0") as (server, url, _):
        for _ in range(20):
            post_and_close(url, body)
            time.sleep(0.1)

        def total(prefix: str) -> int:
            return sum(int(line.split()[-1]) for line in metric_lines(url) if line.startswith(prefix))

        deadline = time.monotonic() + 30
        while total("satic_requests_total{") < 20:
            assert time.monotonic() < deadline, metric_lines(url)
            time.sleep(0.1)
        decoded = total("satic_batch_images_count")
        assert decoded < 20, f"{decoded} of 20 gone clients had their images decoded"
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err


def test_without_the_serve_extra_the_command_names_it_before_loading_anything(tmp_path):
    """A process where fastapi cannot be imported: one line naming the extra, nothing loaded or written."""
    script = ("import sys; sys.modules['fastapi'] = None; from satic.cli import main; "
              f"sys.exit(main(['serve', '--checkpoint', {str(tmp_path / 'nowhere')!r}]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("satic serve: error: satic serve needs the serve extra (")
    assert done.stderr.rstrip().endswith("install it with pip install '.[serve]' in the satic checkout")


@pytest.mark.parametrize("option, value", [("--max-body-mb", "inf"), ("--max-wait-ms", "inf"),
                                           ("--shutdown-timeout", "nan"), ("--max-wait-ms", "-1"),
                                           ("--body-timeout", "inf")])
def test_a_limit_that_is_not_a_finite_number_is_refused_before_loading_anything(capsys, option, value):
    """--max-body-mb inf ended in a traceback (no integer of bytes), --max-wait-ms inf in batches that never start."""
    with pytest.raises(SystemExit) as exit_:
        satic_main(["serve", "--checkpoint", "nowhere", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be a finite number >= 0, got {value}" in err and "Traceback" not in err, err


def test_a_queue_smaller_than_one_request_is_refused_before_loading_anything(capsys):
    """With --max-queue 8 and 32 images allowed per request, a request of 9 got 503 "retry" on every try."""
    assert satic_main(["serve", "--checkpoint", "nowhere", "--max-queue", "8"]) == 2
    assert capsys.readouterr().err == ("satic serve: error: --max-queue 8 is less than --max-images 32: a request of "
                                       "more than 8 images could never be queued; raise --max-queue or lower "
                                       "--max-images\n")


def trickle(sock: socket.socket, data: bytes, every: float = 0.2) -> None:
    """Send `data` a byte every `every` seconds on a thread, until it is all sent or the connection closes."""
    def send():
        with contextlib.suppress(OSError):
            for byte in data:
                sock.sendall(bytes([byte]))
                time.sleep(every)

    threading.Thread(target=send, daemon=True).start()


def slow_upload(port: int) -> socket.socket:
    """A client that sends a caption request's headers and then its body a byte every 0.2 s, reading nothing."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"features\": ")
    trickle(sock, b" " * 100000)
    return sock


def flood(port: int, seconds: float = 3) -> socket.socket:
    """A connection on which GET requests are sent one after the other (HTTP pipelining) for `seconds`, none of
    the answers read, so that the server's writes to it stall (or until the server closes it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while time.monotonic() - started < seconds:
            with contextlib.suppress(BlockingIOError):
                sock.send(b"GET /scenes/0.png HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
            time.sleep(0.01)
    sock.setblocking(True)
    return sock


def reply(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends on `sock` until it closes the connection (b"" if it resets it)."""
    sock.settimeout(seconds)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("signals, timeout", [(["SIGTERM"], "2"), (["SIGTERM", "SIGTERM"], "120")],
                         ids=["shutdown-timeout", "second-signal"])
def test_clients_that_stall_hold_the_shutdown_no_longer_than_its_timeout(tiny_checkpoint, signals, timeout):
    """A client trickling its request body and one that reads none of its answers, when SIGTERM comes: the process
    exits 0 once --shutdown-timeout (2 s) has run out, without a traceback (a request cancelled while writing to
    the client that reads nothing wrote one), the trickling client getting 503; a second signal ends the wait at
    once (it used to wait the whole --shutdown-timeout, here 120 s, for both clients)."""
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--shutdown-timeout", timeout) as (
            server, url, _):
        port = int(url.rsplit(":", 1)[1])
        uploading, reading_nothing = slow_upload(port), flood(port)
        with uploading, reading_nothing:
            err, took = stop_server(server, signals, 1)
            answer = reply(uploading, 10)
    assert server.returncode == 0, err
    assert took < 20, f"the server took {took:.1f} s to stop"
    assert "Traceback" not in err and "CancelledError" not in err, err
    if len(signals) == 1:
        assert answer.startswith(b"HTTP/1.1 503 ") and b"shutting down" in answer, answer


def test_a_body_that_trickles_in_gets_408_after_body_timeout(tiny_checkpoint):
    """--body-timeout 2: a client that sends its headers, then its body a byte every 0.2 s, gets 408 about 2 s
    later, with its connection closed, and is counted; before, it held its request for as long as it trickled."""
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--body-timeout", "2") as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        with slow_upload(port) as uploading:
            answer = reply(uploading, 30)  # the server closes the connection after its answer
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), answer
        assert json.loads(body) == {"error": "the request body took longer to arrive than this server's limit of "
                                             "2 s; send it faster, or in smaller requests"}
        assert 'satic_requests_total{status="408"} 1' in metric_lines(url)
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err


def answer_health(sock: socket.socket) -> bytes:
    """Ask GET /health on an open connection and read the whole answer."""
    sock.settimeout(10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    return data


def test_headers_that_do_not_arrive_in_time_close_the_connection(tiny_checkpoint):
    """--header-timeout 2: a connection that sends nothing, one that trickles a request's headers, and one that
    trickles its second request's headers after its first was answered are each closed about 2 s after they
    opened or got that answer, and counted. A connection whose request is in flight (waiting 4 s for company) is
    not closed, nor one that sends a request every 0.8 s for longer than 2 s. uvicorn itself times none of these."""
    import httpx2

    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--header-timeout", "2", "--max-wait-ms",
                       "4000") as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
        opened = time.monotonic()
        silent, slow, second = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
        with silent, slow, second, concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert answer_health(second).startswith(b"HTTP/1.1 200 ")
            trickle(slow, head)
            trickle(second, head)
            waiting = pool.submit(httpx2.post, f"{url}/v1/captions", json={"features": [[[0.5] * 8]]}, timeout=30)
            answers = [reply(sock, 10) for sock in (silent, slow, second)]
            took = time.monotonic() - opened
            assert not waiting.done()  # it waits 4 s for company, on a connection that is not closed
            assert waiting.result().status_code == 200
        assert answers == [b"", b"", b""] and 2 <= took < 8, (answers, took)
        with socket.create_connection(("127.0.0.1", port)) as steady:  # a request every 0.8 s, for 3.2 s
            for _ in range(5):
                assert answer_health(steady).startswith(b"HTTP/1.1 200 ")
                time.sleep(0.8)
        assert 'satic_connection_timeouts_total{kind="header"} 3' in metric_lines(url)
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err


def test_a_client_that_reads_no_answers_is_closed_after_send_timeout(tiny_checkpoint):
    """--send-timeout 2: a client that sends requests and reads none of the answers has its connection closed
    once the answers waiting for it have not moved for about 2 s, and it is counted; uvicorn alone holds it until
    shutdown. A client that does the same, then reads 256 KB every 0.5 s for 4 s, is not closed."""
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--send-timeout", "2") as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        with flood(port, 1) as stalled, flood(port, 1) as reading:
            reading.settimeout(10)
            for _ in range(8):
                got = 0
                while got < 256 * 1024:
                    chunk = reading.recv(65536)
                    assert chunk, "the connection of a client that reads was closed"
                    got += len(chunk)
                time.sleep(0.5)
            with pytest.raises(ConnectionError):  # closed by the server: sending fails
                for _ in range(100):
                    stalled.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    time.sleep(0.01)
        lines = [line for line in metric_lines(url) if line.startswith("satic_connection_timeouts_total")]
        assert lines == ['satic_connection_timeouts_total{kind="header"} 0',
                         'satic_connection_timeouts_total{kind="send"} 1'], lines
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err


class Transport:
    def __init__(self):
        self.unsent, self.closing, self.aborted = 0, False, False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def abort(self) -> None:  # as asyncio's: what was not sent is dropped
        self.aborted, self.unsent = True, 0


class Connection:
    """What the connection watcher reads of a uvicorn protocol: its request cycle and transport."""
    def __init__(self, cycle=None):
        self.cycle, self.transport = cycle, Transport()


def test_connection_timeouts_count_from_the_last_change_of_what_a_connection_waits_for(monkeypatch):
    """The connection watcher, tick by tick on a clock of its own: a connection waiting for a request's headers is
    closed `header` seconds after it began waiting (its opening, or its request's answer), one with answers
    unsent `send` seconds after they last moved; a request in flight, a transport already closing and a limit of
    0 close nothing; uvicorn's own tick still runs and says when to exit."""
    from types import SimpleNamespace

    import satic.cli.serve as serve_cli
    from satic.serve.metrics import ServeMetrics

    clock, ticks = [0.0], []

    async def uvicorn_tick(counter: int) -> bool:
        ticks.append(counter)
        return counter < 0  # a stand-in for uvicorn's "should exit"

    monkeypatch.setattr(serve_cli.time, "monotonic", lambda: clock[0])
    idle, busy, reading, stalled, closing = (Connection() for _ in range(5))
    busy.cycle = SimpleNamespace(response_complete=False)
    reading.cycle = stalled.cycle = SimpleNamespace(response_complete=True)
    reading.transport.unsent = stalled.transport.unsent = 5000
    closing.transport.closing = True
    connections = {idle, busy, reading, stalled, closing}
    server = SimpleNamespace(server_state=SimpleNamespace(connections=connections), on_tick=uvicorn_tick)
    metrics = ServeMetrics()
    on_tick = serve_cli.watch_connections(server, 3.0, 2.0, metrics)

    def tick_until(seconds: float) -> list:
        while clock[0] < seconds - 1e-9:
            assert asyncio.run(on_tick(len(ticks))) is False
            reading.transport.unsent -= 10  # the client reads a little
            clock[0] = round(clock[0] + 0.1, 1)
        return [c for c in (idle, busy, reading, stalled, closing) if c.transport.aborted]

    assert tick_until(2.0) == []
    assert tick_until(2.1) == [stalled]  # its 5000 bytes have not moved for 2 s
    busy.cycle.response_complete = True  # answered at 2.1: now it waits for headers
    assert tick_until(3.0) == [stalled]
    assert tick_until(3.1) == [idle, stalled]
    busy.cycle = SimpleNamespace(response_complete=True)  # a new request, answered at once, at 4.0
    assert tick_until(5.2) == [idle, stalled]
    assert tick_until(7.1) == [idle, busy, stalled]
    assert reading.cycle.response_complete and not reading.transport.aborted and not closing.transport.aborted
    lines = [line for line in metrics.render().splitlines() if line.startswith("satic_connection_timeouts_total")]
    assert lines == ['satic_connection_timeouts_total{kind="header"} 2',
                     'satic_connection_timeouts_total{kind="send"} 1']
    assert asyncio.run(on_tick(-1)) is True and ticks[:3] == [0, 1, 2]

    waiting = Connection()
    server.server_state.connections = {waiting}
    on_tick = serve_cli.watch_connections(server, 0.0, 2.0, metrics)  # no header limit
    tick_until(20.0)
    assert not waiting.transport.aborted


@pytest.mark.parametrize("hard", ["same", "higher"])
def test_connections_beyond_the_open_file_limit_wait_and_are_explained_in_one_line(tiny_checkpoint, hard):
    """Started with a soft limit of 100 open files: where the hard limit is higher the server lifts its own and
    holds 150 idle connections while it answers. Where it is not, a new connection waits until others close, the
    log says why in one line (not asyncio's traceback at every retry), and SIGTERM while connections wait ends
    the server cleanly (asyncio's queued retries of accept() then run on a closed socket)."""
    import httpx2

    soft = 100
    limit = (soft, soft if hard == "same" else resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    if hard == "higher" and limit[1] != resource.RLIM_INFINITY and limit[1] < 1000:
        pytest.skip("needs a hard limit of open files above 1000")
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", open_files=limit) as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
        try:
            if hard == "higher":
                assert httpx2.get(f"{url}/health", timeout=10).status_code == 200
            else:
                with pytest.raises(httpx2.TimeoutException):
                    httpx2.get(f"{url}/health", timeout=2.5)
                for sock in idle[:100]:
                    sock.close()
                assert httpx2.get(f"{url}/health", timeout=10).status_code == 200  # room again
                idle[:100] = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
                time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
        finally:
            for sock in idle:
                sock.close()
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err
    said = [line for line in err.splitlines() if "cannot accept" in line]
    if hard == "same":
        assert said == ["satic serve: cannot accept new connections: Too many open files (the open-file limit is "
                        "100); they wait until others close: raise the limit (ulimit -n), or put a proxy in front "
                        "(docs/serving.md)"], err
    else:
        assert said == [], err


def upload_behind_a_long_batch(url: str, pool, kind: str = "image"):
    """A batch of model 'big' on the worker thread (tens of seconds), and a connection with a request for model
    'grid' (an uploaded image, or kind="scene": a rendered scene) whose features wait for the worker to extract
    them: (the batch's answer to come, that connection)."""
    import httpx2

    image = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image, format="PNG")
    part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image.getvalue() + b"\r\n--b\r\n"
            b'Content-Disposition: form-data; name="model"\r\n\r\ngrid\r\n--b--\r\n')
    content_type, body = (b"application/json", b'{"scene": 0, "model": "grid"}') if kind == "scene" else (
        b"multipart/form-data; boundary=b", part)
    deadline = time.monotonic() + 60
    batch = pool.submit(httpx2.post, f"{url}/v1/captions", json={**huge_request(16), "model": "big"}, timeout=300)
    while "satic_worker_busy 1" not in metric_lines(url):
        assert time.monotonic() < deadline and not batch.done(), "the batch never started"
        time.sleep(0.1)
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (content_type, len(body), body))
    time.sleep(0.5)  # its body read, it waits for the worker
    return batch, sock


@pytest.mark.parametrize("kind", ["image", "scene"])
def test_a_client_that_leaves_before_its_images_are_read_is_counted_and_they_are_not(tmp_path, grid_checkpoint,
                                                                                     kind):
    """An upload (or a rendered scene, for a grid model) waits for the worker thread, busy with a long batch, to
    extract its image's features; its client closes the connection meanwhile. It is counted as 499 at once, while
    that batch still runs (before, its image was read and its features extracted after the batch, and only then was
    the client found gone)."""
    with serve_process("--checkpoint", f"big={big_checkpoint(tmp_path / 'big')}", "--checkpoint",
                       f"grid={grid_checkpoint}", "--max-wait-ms", "0") as (server, url, _):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batch, sock = upload_behind_a_long_batch(url, pool, kind)
            sock.close()
            while 'satic_requests_total{status="499"} 1' not in (lines := metric_lines(url)):
                assert not batch.done(), "the gone client was noticed only after the batch"
                time.sleep(0.1)
            assert not [line for line in lines if line.startswith("satic_batch_images_count")], lines
            err, _ = stop_server(server, ["SIGTERM", "SIGTERM"], 0.5)  # the batch abandoned: no waiting for it
            assert batch.result().status_code == 503
    assert server.returncode == 0 and "Traceback" not in err, err


def test_a_second_signal_answers_an_upload_waiting_for_the_worker_at_once(tmp_path, grid_checkpoint):
    """SIGTERM twice while an upload waits for the worker thread, busy with a long batch, to extract its features:
    the upload gets 503 and the process exits in seconds (before, the upload held it for --shutdown-timeout)."""
    with serve_process("--checkpoint", f"big={big_checkpoint(tmp_path / 'big')}", "--checkpoint",
                       f"grid={grid_checkpoint}", "--max-wait-ms", "0", "--shutdown-timeout", "120") as (
            server, url, _):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batch, sock = upload_behind_a_long_batch(url, pool)
            with sock:
                err, took = stop_server(server, ["SIGTERM", "SIGTERM"], 0.5)
                answer = reply(sock, 10)
            assert batch.result().status_code == 503
    assert server.returncode == 0 and "Traceback" not in err, err
    assert took < 20, f"the server took {took:.1f} s to stop"
    assert answer.startswith(b"HTTP/1.1 503 ") and b"send the request again" in answer, answer
