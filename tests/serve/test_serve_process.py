"""`satic serve` as a real process on a loopback port: /health, the reference fixture's captions, 32
concurrent requests each answered with its own captions, and SIGTERM while a request is in flight (that
request is answered, then the process exits 0); a batch that outlives --shutdown-timeout is abandoned."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

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
def serve_process(*args: str):
    """`satic serve ARGS` on a free loopback port, answering /health: (the process, its URL, /health's answer);
    killed at the end if it is still running."""
    import httpx2

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "satic", "serve", *args, "--port", str(port), "--threads", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(WORDS), group_size=2, num_layers=4, d_model=384, d_ff=1536, num_heads=8,
                         att_feat_size=8, max_positions=64)
    big = save_checkpoint(tmp_path / "big", SATModel(config), Vocabulary(WORDS))
    rng = np.random.default_rng(0)
    huge = {"features": [rng.standard_normal((1024, 8)).round(3).tolist() for _ in range(32)]}

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
            signalled = time.monotonic()
            for name in signals:
                server.send_signal(getattr(signal, name))
                time.sleep(0.5)
            _, err = server.communicate(timeout=60)
            took = time.monotonic() - signalled
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


def test_clients_that_leave_while_queued_are_counted_as_gone_and_not_decoded(tiny_checkpoint):
    """Three clients send their features and close the connection while the requests wait --max-wait-ms for
    company: each is counted as 499, none as captioned, and no batch decodes their images."""
    import httpx2

    body = json.dumps({"features": [[[1.0] * 8]]}).encode()
    with serve_process("--checkpoint", f"tiny={tiny_checkpoint}", "--max-wait-ms", "3000") as (server, url, _):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(0.2)
        time.sleep(4)  # past --max-wait-ms
        metrics = httpx2.get(f"{url}/metrics", timeout=10).text.splitlines()
        assert 'satic_requests_total{status="499"} 3' in metrics, metrics
        assert not [line for line in metrics if line.startswith(("satic_images_total{", "satic_batch_images_count"))]
        assert "satic_queue_images 0" in metrics
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
                                           ("--shutdown-timeout", "nan"), ("--max-wait-ms", "-1")])
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
