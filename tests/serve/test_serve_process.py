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
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

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
        rng = np.random.default_rng(7)
        requests = [regions(rng, 1 + i % 3) for i in range(32)]
        with concurrent.futures.ThreadPoolExecutor(33) as pool:
            reference = pool.submit(httpx2.post, f"{url}/v1/captions", json={"features": six, "model": "ref-k2"},
                                    timeout=60)
            answers = list(pool.map(lambda f: httpx2.post(f"{url}/v1/captions",
                                                          json={"features": [x.tolist() for x in f]},
                                                          timeout=60), requests))
            answer = reference.result()
        assert answer.json()["captions"] == [e["caption"] for e in expected["greedy_batched"]]
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


def test_ctrl_c_stops_an_idle_server_as_interrupted(tiny_checkpoint):
    """Ctrl-C (SIGINT) with nothing in flight: uvicorn stops, and the command exits 130 saying it was interrupted."""
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}") as (server, url, _):
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 130 and "Traceback" not in err, err
    assert err.endswith("satic serve: interrupted\n"), err


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A 4-layer, 384-wide model: 32 images of 1024 regions take it ~25 s on one thread."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(WORDS), group_size=2, num_layers=4, d_model=384, d_ff=1536, num_heads=8,
                         att_feat_size=8, max_positions=64)
    return save_checkpoint(tmp_path_factory.mktemp("big") / "big", SATModel(config), Vocabulary(WORDS))


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
def test_a_batch_that_outlives_the_shutdown_is_abandoned(big_checkpoint, signals, timeout, said):
    """SIGTERM during a batch of ~25 s (32 images of 1024 regions through a 4-layer, 384-wide model on one
    thread; ~0.6 GB) with --shutdown-timeout 0.5, or SIGTERM then Ctrl-C (a forced stop) with 60 s: the process
    exits 0 within seconds, saying so, without waiting for the batch nor writing a traceback; the request being
    decoded and the one queued behind it are refused with 503 (or their connections close with the process)."""
    import httpx2

    huge = huge_request(32)

    def post(body):
        try:
            return httpx2.post(f"{url}/v1/captions", json=body, timeout=120)
        except httpx2.TransportError:  # the connection closed with the process
            return None

    with serve_process("--checkpoint", f"big={big_checkpoint}", "--max-wait-ms", "0", "--shutdown-timeout",
                       timeout) as (server, url, _):
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
    for i, name in enumerate(signals):
        if i:
            time.sleep(pause)
        server.send_signal(getattr(signal, name))
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


def test_a_port_in_use_is_named_in_one_line(tiny_checkpoint):
    """uvicorn logs why it cannot bind and exits; the command then says which address, and exits 2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "satic", "serve", "--checkpoint", f"tiny={tiny_checkpoint}",
                               "--port", str(port), "--threads", "1"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.endswith(f"satic serve: error: could not listen on 127.0.0.1:{port} (in use, or not an address "
                                "of this machine?)\n"), done.stderr


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


@pytest.mark.parametrize("option, value, said", [
    ("--checkpoint", "my model=nowhere", "argument --checkpoint: model name 'my model' in 'my model=nowhere': use "
                                         "NAME=DIR with a name without spaces or slashes"),
    ("--checkpoint", "a/b=nowhere", "argument --checkpoint: model name 'a/b' in 'a/b=nowhere': use NAME=DIR"),
    ("--checkpoint", "/", "argument --checkpoint: model name '' in '/': use NAME=DIR"),
    ("--max-wait-ms", "soon", "argument --max-wait-ms: expected a number, got 'soon'"),
    ("--port", "65536", "argument --port: a TCP port is 0..65535, got 65536")])
def test_a_bad_model_name_number_or_port_is_refused_in_one_line(capsys, option, value, said):
    with pytest.raises(SystemExit) as exit_:
        satic_main(["serve", "--checkpoint", "nowhere", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_serve_takes_each_documented_choice_and_needs_a_checkpoint(capsys):
    from satic.cli.serve import build_parser

    parser = build_parser()
    assert [parser.parse_args(["--checkpoint", "m", "--port", port]).port for port in ("0", "65535")] == [0, 65535]
    assert [parser.parse_args(["--checkpoint", "m", "--precision", p]).precision
            for p in ("fp32", "bf16", "int8")] == ["fp32", "bf16", "int8"]
    levels = ("critical", "error", "warning", "info", "debug")
    assert [parser.parse_args(["--checkpoint", "m", "--log-level", level]).log_level for level in levels] == \
        list(levels)
    with pytest.raises(SystemExit) as exit_:
        satic_main(["serve"])
    assert exit_.value.code == 2
    assert "error: the following arguments are required: --checkpoint" in capsys.readouterr().err


def test_two_checkpoints_of_one_name_are_refused_before_loading_anything(tmp_path, capsys):
    """Two directories of the same name (`runs/a/best`, `runs/b/best`) need a NAME= each."""
    assert satic_main(["serve", "--checkpoint", str(tmp_path / "a" / "best"), "--checkpoint",
                       str(tmp_path / "b" / "best")]) == 2
    assert capsys.readouterr().err == ("satic serve: error: two checkpoints are named 'best'; name them with "
                                       "--checkpoint NAME=DIR\n")


def test_every_option_reaches_the_server_and_its_settings(monkeypatch, captioners, tmp_path):
    """`satic serve`'s options as the app, uvicorn's server and the shutdown get them (models loaded and the server
    run by stand-ins here; the real process is tested above)."""
    import satic.cli.serve as serve_cli
    from satic.serve import Limits, ServeSettings

    got = {}

    def load_models(specs, precision, device):
        got.update(specs=specs, precision=precision, device=device)
        return captioners

    def run_server(server, app, args):
        got.setdefault("runs", []).append((server, app, args))
        return 0

    monkeypatch.setattr(serve_cli, "load_models", load_models)
    monkeypatch.setattr(serve_cli, "run_server", run_server)
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: got.update(lifted=True))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: got.update(threads=n))
    multipart_log = logging.getLogger("python_multipart")  # its line per malformed body, whose client gets a 400
    monkeypatch.setattr(multipart_log, "level", logging.NOTSET)
    first, second = tmp_path / "first", tmp_path / "second"
    assert serve_cli.main(["--checkpoint", f"one={first}", "--checkpoint", str(second), "--host", "::1", "--port", "0",
                           "--max-batch", "3", "--max-wait-ms", "2.5", "--max-queue", "40", "--max-images", "5",
                           "--max-regions", "77", "--max-body-mb", "1.5", "--header-timeout", "0",
                           "--body-timeout", "4", "--send-timeout", "8", "--shutdown-timeout", "7",
                           "--precision", "bf16", "--device", "meta", "--threads", "2", "--log-level", "warning"]) == 0
    assert got["specs"] == [("one", [first]), ("second", [second])]
    assert (got["precision"], got["device"], got["threads"], got["lifted"]) == ("bf16", "meta", 2, True)
    assert multipart_log.getEffectiveLevel() == logging.ERROR
    server, app, args = got["runs"][0]
    assert app.state.service.settings == ServeSettings(max_batch=3, max_wait_ms=2.5, max_queue=40,
                                                       max_body_bytes=1572864, body_timeout_s=4.0,
                                                       limits=Limits(max_images=5, max_regions=77))
    config = server.config
    assert (config.host, config.port, config.log_level, config.lifespan, config.timeout_graceful_shutdown) == \
        ("::1", 0, "warning", "on", 7.0)
    assert (args.header_timeout, args.send_timeout, args.shutdown_timeout) == (0.0, 8.0, 7.0)

    got.clear()  # the defaults, and a queue of one largest request; --max-regions then a grid model's own count
    assert serve_cli.main(["--checkpoint", str(first), "--max-queue", "32"]) == 0  # where that is more than 1024
    assert "threads" not in got and (got["precision"], got["device"]) == ("fp32", "cpu")
    server, app, args = got["runs"][0]
    assert app.state.service.settings == ServeSettings(max_queue=32, limits=Limits(
        max_regions=serve_cli.default_max_regions(captioners)))
    assert (server.config.host, server.config.port, server.config.log_level) == ("127.0.0.1", 8000, "info")
    assert (args.header_timeout, args.send_timeout, args.shutdown_timeout) == (60.0, 60.0, 60.0)


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


def flood(port: int, seconds: float = 1) -> socket.socket:
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
    """--header-timeout 2 (and no send timeout): a connection that sends nothing, one that trickles a request's
    headers, and one that trickles its second request's headers after its first was answered are each closed about
    2 s after they opened or got that answer, and counted. A connection whose request is in flight (waiting 4 s for
    company) is not closed, nor one that sends a request every 0.8 s for longer than 2 s. uvicorn itself times none
    of these."""
    import httpx2

    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--header-timeout", "2", "--send-timeout", "0",
                       "--max-wait-ms", "4000") as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"

        def steady() -> None:  # a request every 0.8 s, for 3.2 s
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for i in range(5):
                    if i:
                        time.sleep(0.8)
                    assert answer_health(sock).startswith(b"HTTP/1.1 200 "), f"request {i + 1} of the steady client"

        opened = time.monotonic()
        silent, slow, second = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
        with silent, slow, second, concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert answer_health(second).startswith(b"HTTP/1.1 200 ")
            trickle(slow, head)
            trickle(second, head)
            waiting = pool.submit(httpx2.post, f"{url}/v1/captions", json={"features": [[[0.5] * 8]]}, timeout=30)
            steadily = pool.submit(steady)
            answers = [reply(sock, 10) for sock in (silent, slow, second)]
            took = time.monotonic() - opened
            assert not waiting.done()  # it waits 4 s for company, on a connection that is not closed
            assert waiting.result().status_code == 200
            steadily.result()
        assert answers == [b"", b"", b""] and 2 <= took < 8, (answers, took)
        assert 'satic_connection_timeouts_total{kind="header"} 3' in metric_lines(url)
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err


def test_a_client_that_reads_no_answers_is_closed_after_send_timeout(tiny_checkpoint):
    """--send-timeout 2 (and no header timeout): a client that sends requests and reads none of the answers has its
    connection closed once the answers waiting for it have not moved for about 2 s, and it is counted; uvicorn alone
    holds it until shutdown. A client that does the same, then reads 256 KB every 0.5 s for 4 s, is not closed."""
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--send-timeout", "2", "--header-timeout",
                       "0") as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            stalled, reading = pool.map(flood, [port, port])
        with stalled, reading:
            reading.settimeout(10)
            for _ in range(8):
                got = 0
                while got < 256 * 1024:
                    chunk = reading.recv(65536)
                    assert chunk, "the connection of a client that reads was closed"
                    got += len(chunk)
                time.sleep(0.5)
            with pytest.raises(ConnectionError):  # closed by the server: sending fails (a deadline for a slow machine)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
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
    gone = weakref.ref(waiting)  # closed: the watcher holds nothing of it once a tick has passed
    server.server_state.connections = set()
    del waiting
    tick_until(20.1)
    assert gone() is None


class StandInServer:
    """What run_server uses of uvicorn's Server: `run` (here the given behaviour), `startup`, `started`,
    `handle_exit` (the signal handler uvicorn installs) and `on_tick`."""

    def __init__(self, behaviour):
        self.behaviour, self.started, self.stopped, self.loop_handlers = behaviour, False, [], []
        self.handle_exit = lambda signum, frame: self.stopped.append(signum)

    async def on_tick(self, counter: int) -> bool:
        return False

    async def startup(self, sockets=None) -> None:
        self.started = True

    def run(self) -> None:
        self.behaviour(self)


def serves(*signals: int, wait: float = 0.0):
    """A stand-in server's run: it starts, receives `signals` one after the other, and ends `wait` s later."""
    def run(server):
        async def main():
            await server.startup()
            server.loop_handlers.append(asyncio.get_running_loop().get_exception_handler())
            for signum in signals:
                server.handle_exit(signum, None)
                await asyncio.sleep(0.01)
            await asyncio.sleep(wait)

        asyncio.run(main())
    return run


def test_run_server_stops_on_a_signal_and_ends_in_the_matching_exit(monkeypatch, capsys):
    """The first SIGTERM or Ctrl-C stops uvicorn, drains the queue and closes stalled connections once
    --shutdown-timeout has passed; a second abandons the batch and closes the connections still sending at once.
    The exit: 0, KeyboardInterrupt after Ctrl-C, one line where uvicorn could not listen, and os._exit (0, or 130
    after Ctrl-C) where a batch is still decoding. The connection watcher ticks only with a header or send limit."""
    from argparse import Namespace
    from types import SimpleNamespace

    import satic.cli.serve as serve_cli
    from satic.errors import SaticError

    class Exited(Exception):
        pass

    def exit_(code):
        exits.append(code)
        raise Exited

    calls, exits = [], []
    monkeypatch.setattr(serve_cli.os, "_exit", exit_)
    batcher = SimpleNamespace(busy=False, drain=lambda: calls.append("drain"), abandon=lambda: calls.append("abandon"))
    app = SimpleNamespace(state=SimpleNamespace(service=SimpleNamespace(batcher=batcher, metrics=None)))
    args = Namespace(host="127.0.0.1", port=8000, header_timeout=0.0, send_timeout=0.0, shutdown_timeout=0.05)
    monkeypatch.setattr(serve_cli, "close_stalled", lambda server, sending_too: calls.append(("close", sending_too)))
    before = signal.getsignal(signal.SIGTERM)

    server = StandInServer(serves(signal.SIGTERM, wait=0.5))
    assert serve_cli.run_server(server, app, args) == 0
    assert server.stopped == [signal.SIGTERM] and calls == ["drain", ("close", False)]
    assert server.on_tick.__func__ is StandInServer.on_tick  # uvicorn's own tick: no limit to watch
    assert signal.getsignal(signal.SIGTERM) == before
    assert server.loop_handlers[0].__qualname__.startswith("accept_failures_in_one_line")

    calls.clear()
    server = StandInServer(serves(signal.SIGTERM, signal.SIGINT))  # before the shutdown timeout's end
    assert serve_cli.run_server(server, app, Namespace(**{**vars(args), "shutdown_timeout": 60.0})) == 0
    assert server.stopped == [signal.SIGTERM] and calls == ["drain", "abandon", ("close", True)]

    for header, send in ((2.0, 0.0), (0.0, 2.0)):
        server = StandInServer(serves())
        assert serve_cli.run_server(server, app, Namespace(**{**vars(args), "header_timeout": header,
                                                              "send_timeout": send})) == 0
        assert not hasattr(server.on_tick, "__func__")  # the watcher's

    def interrupted(server):
        serves()(server)
        raise KeyboardInterrupt

    def stopped_while_starting(server):
        raise KeyboardInterrupt

    def cannot_bind(server):
        raise SystemExit(1)

    def exits_after_starting(server):
        serves()(server)
        raise SystemExit(3)

    for behaviour, raised in ((interrupted, KeyboardInterrupt), (stopped_while_starting, KeyboardInterrupt),
                              (cannot_bind, SaticError), (exits_after_starting, SystemExit)):
        with pytest.raises(raised) as error:
            serve_cli.run_server(StandInServer(behaviour), app, args)
        assert signal.getsignal(signal.SIGTERM) == before
    assert str(error.value) == "3"
    with pytest.raises(SaticError, match=r"^could not listen on 127\.0\.0\.1:8000 \(in use, or not an address"):
        serve_cli.run_server(StandInServer(cannot_bind), app, args)

    assert exits == []
    batcher.busy = True
    capsys.readouterr()

    class Stdout(io.StringIO):  # uvicorn's access log: flushed before an exit that skips Python's own flushing
        flushes = 0

        def flush(self):
            self.flushes += 1

    monkeypatch.setattr(sys, "stdout", Stdout())
    for behaviour, when in ((serves(signal.SIGTERM), "after --shutdown-timeout 0.05 s"),
                            (serves(signal.SIGTERM, signal.SIGTERM), "at a second signal"),
                            (interrupted, "after --shutdown-timeout 0.05 s")):
        with pytest.raises(Exited):
            serve_cli.run_server(StandInServer(behaviour), app, args)
        assert capsys.readouterr().err == f"satic serve: a batch still decoding {when} was abandoned; exiting\n"
    assert exits == [0, 0, 130] and sys.stdout.flushes >= 3


def test_a_shutdown_closes_the_connections_that_would_hold_it(monkeypatch):
    """Connections between requests and those whose answers wait for a client that reads nothing are closed at the
    first signal's deadline; one still sending its request only at a second signal; a request being decoded never."""
    from types import SimpleNamespace

    import satic.cli.serve as serve_cli

    idle, answered, paused, sending, decoding, unknown = (Connection() for _ in range(6))
    answered.cycle = SimpleNamespace(response_complete=True)
    paused.cycle, paused.flow = SimpleNamespace(response_complete=False), SimpleNamespace(write_paused=True)
    sending.cycle = SimpleNamespace(response_complete=False, more_body=True)
    decoding.cycle, decoding.flow = SimpleNamespace(response_complete=False, more_body=False), \
        SimpleNamespace(write_paused=False)
    unknown.cycle = SimpleNamespace()  # a protocol that says nothing of its request: taken as in flight
    every = (idle, answered, paused, sending, decoding, unknown)
    server = SimpleNamespace(server_state=SimpleNamespace(connections=set(every)))
    serve_cli.close_stalled(server, False)
    assert [c.transport.aborted for c in every] == [True, True, True, False, False, False]
    serve_cli.close_stalled(server, True)
    assert [c.transport.aborted for c in every] == [True, True, True, True, False, False]


@pytest.mark.parametrize("limits, lifted", [
    ((1024, 4096), (4096, 4096)), ((1024, resource.RLIM_INFINITY), (65536, resource.RLIM_INFINITY)),
    ((100_000, resource.RLIM_INFINITY), None), ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), None),
    ((4096, 4096), None)])
def test_the_open_file_limit_is_lifted_to_the_hard_one(monkeypatch, limits, lifted):
    """The soft limit is raised to the hard one, or to 65536 under an unlimited hard one, never lowered; a system
    that refuses (macOS allows less than it says) leaves it as it is."""
    import satic.cli.serve as serve_cli

    asked = []
    monkeypatch.setattr(serve_cli.resource, "getrlimit", lambda which: limits)
    monkeypatch.setattr(serve_cli.resource, "setrlimit", lambda which, value: asked.append((which, value)))
    serve_cli.raise_open_file_limit()
    assert asked == ([] if lifted is None else [(resource.RLIMIT_NOFILE, lifted)])

    def refuse(which, value):
        raise ValueError("not allowed")

    monkeypatch.setattr(serve_cli.resource, "setrlimit", refuse)
    serve_cli.raise_open_file_limit()  # no error


def test_connections_the_server_cannot_accept_are_explained_once_a_minute(monkeypatch, capsys):
    """asyncio's error when accept() finds no file descriptor becomes one line, at most once every 60 s; its
    retries that run after the server closed are dropped; every other error goes to asyncio's own handler."""
    import errno
    from types import SimpleNamespace

    import satic.cli.serve as serve_cli

    clock, passed_on = [1000.0], []
    monkeypatch.setattr(serve_cli.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(serve_cli.resource, "getrlimit", lambda which: (100, 4096))  # the soft limit is said
    loop = SimpleNamespace(default_exception_handler=passed_on.append)
    handle = serve_cli.accept_failures_in_one_line()
    full = {"message": "socket.accept() out of system resource",
            "exception": OSError(errno.EMFILE, "Too many open files")}
    said = ("satic serve: cannot accept new connections: Too many open files (the open-file limit is 100); they "
            "wait until others close: raise the limit (ulimit -n), or put a proxy in front (docs/serving.md)\n")
    handle(loop, full)
    assert capsys.readouterr().err == said
    clock[0] += 59.5
    handle(loop, full)
    assert capsys.readouterr().err == ""
    clock[0] += 0.5  # 60 s after the line before
    handle(loop, full)
    assert capsys.readouterr().err == said

    def _start_serving():
        pass

    retry = {"message": "Exception in callback", "exception": ValueError("closed"),
             "handle": SimpleNamespace(_callback=_start_serving)}
    other = [{"message": "socket.accept() out of system resource", "exception": ValueError("not an OSError")},
             {"message": "something else", "exception": OSError(errno.EMFILE, "Too many open files")},
             {"message": "Exception in callback", "exception": ValueError("closed"), "handle": None},
             {"message": "Exception in callback", "exception": KeyError("x"),
              "handle": SimpleNamespace(_callback=_start_serving)}]
    clock[0] += 60  # a line would be due: none for these
    for context in [retry, *other]:
        handle(loop, context)
    assert passed_on == other and capsys.readouterr().err == ""


def test_a_grid_model_whose_backbone_is_missing_fails_before_serving(tmp_path):
    """Its extractor is built while loading, so the server never starts, rather than failing the first upload."""
    from satic.cli.serve import load_models
    from satic.errors import SaticError
    from satic.model.checkpoint import FeatureSpec

    from serve_helpers import GRID

    path = save_checkpoint(tmp_path / "grid", SATModel(ModelConfig(vocab_size=len(WORDS), num_layers=1, d_model=16,
                                                                   d_ff=32, num_heads=2, att_feat_size=1280)),
                           Vocabulary(WORDS), FeatureSpec(kind="grid", extractor={**GRID, "backbone": "no-such-net"}))
    with pytest.raises(SaticError, match="unknown backbone 'no-such-net'"):
        load_models([("grid", [path])], "fp32", "cpu")


def test_each_model_is_warmed_up_before_serving(tiny_checkpoint, capsys):
    """A model that records each new batch shape (bf16 on the CPU) has decoded once before the first request."""
    from satic.cli.serve import load_models

    decoder = load_models([("tiny", [tiny_checkpoint])], "bf16", "cpu")["tiny"].decoder
    assert decoder.records_shapes and decoder.recordings() != (0, 0)
    assert capsys.readouterr().err == "satic serve: model 'tiny': K=2, bottom-up features of 8\n"


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
def test_a_client_that_leaves_before_its_images_are_read_is_counted_and_they_are_not(big_checkpoint, grid_checkpoint,
                                                                                     kind):
    """An upload (or a rendered scene, for a grid model) waits for the worker thread, busy with a long batch, to
    extract its image's features; its client closes the connection meanwhile. It is counted as 499 at once, while
    that batch still runs (before, its image was read and its features extracted after the batch, and only then was
    the client found gone)."""
    with serve_process("--checkpoint", f"big={big_checkpoint}", "--checkpoint", f"grid={grid_checkpoint}",
                       "--max-wait-ms", "0") as (server, url, _):
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


def test_a_second_signal_answers_an_upload_waiting_for_the_worker_at_once(big_checkpoint, grid_checkpoint):
    """SIGTERM twice while an upload waits for the worker thread, busy with a long batch, to extract its features:
    the upload gets 503 and the process exits in seconds (before, the upload held it for --shutdown-timeout)."""
    with serve_process("--checkpoint", f"big={big_checkpoint}", "--checkpoint",
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
