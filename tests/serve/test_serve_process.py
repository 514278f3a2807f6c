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
import torch

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


def test_a_batch_that_outlives_the_shutdown_timeout_is_abandoned(tmp_path):
    """SIGTERM during a batch of ~25 s (32 images of 1024 regions through a 4-layer, 384-wide model on one
    thread; ~0.6 GB) with --shutdown-timeout 0.5: the process exits 0 within seconds, saying so, without
    waiting for the batch."""
    import httpx2

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(WORDS), group_size=2, num_layers=4, d_model=384, d_ff=1536, num_heads=8,
                         att_feat_size=8, max_positions=64)
    big = save_checkpoint(tmp_path / "big", SATModel(config), Vocabulary(WORDS))
    rng = np.random.default_rng(0)
    huge = {"features": [rng.standard_normal((1024, 8)).round(3).tolist() for _ in range(32)]}
    with serve_process("--checkpoint", f"big={big}", "--max-wait-ms", "0", "--shutdown-timeout", "0.5") as (
            server, url, _):
        deadline = time.monotonic() + 60
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx2.post, f"{url}/v1/captions", json=huge, timeout=120)
            while "satic_worker_busy 1" not in httpx2.get(f"{url}/metrics", timeout=10).text.splitlines():
                assert time.monotonic() < deadline and not in_flight.done(), "the batch never started"
                time.sleep(0.1)
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            _, err = server.communicate(timeout=60)
            took = time.monotonic() - signalled
            try:
                answer = in_flight.result()
            except httpx2.TransportError:  # the connection closed with the process
                answer = None
        assert server.returncode == 0, err
        assert took < 10, f"the server took {took:.1f} s to stop"
        assert "a batch still decoding after --shutdown-timeout 0.5 s was abandoned" in err
        assert answer is None or answer.status_code >= 500


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
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err and "ClientDisconnect" not in err, err


def test_without_the_serve_extra_the_command_names_it_before_loading_anything(tmp_path):
    """A process where fastapi cannot be imported: one line naming the extra, nothing loaded or written."""
    script = ("import sys; sys.modules['fastapi'] = None; from satic.cli import main; "
              f"sys.exit(main(['serve', '--checkpoint', {str(tmp_path / 'nowhere')!r}]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("satic serve: error: satic serve needs the serve extra (")
    assert done.stderr.rstrip().endswith("install it with pip install '.[serve]' in the satic checkout")
