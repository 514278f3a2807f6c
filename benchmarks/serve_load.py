"""Load on `satic serve` over loopback: requests/s and p50/p99 latency with and without dynamic batching.

Models (random weights unless --demo-run names a `satic demo` output): the paper-size K=2 model
(6 layers, d_model 512, d_ff 2048, 9487 words, 36 regions x 2048) and demo-size K=1/2/4 models
(configs/demo sizes: 2 layers, d_model 128, d_ff 256, 4 heads). Every request is one image's 36 regions
of the model's feature size (2048; 128 for the demo's trained models) as JSON, greedy. One server process
holds all the models; it runs twice: with dynamic batching
(--max-batch 32 --max-wait-ms 5) and serial (--max-batch 1: every request decoded on its own). Clients
keep 1, 8 or 32 requests in flight (closed loop); each cell sends --requests requests (or stops after
--seconds) after an untimed warm-up round. Also timed, in this process before the servers start: one
32-image decode of the paper-size model, before and after the servers run (the better of the two),
the yardstick for the batched p99 latency.

    python benchmarks/serve_load.py                 # all cells, a few minutes on 2 cores
    python benchmarks/serve_load.py --quick         # fewer requests, concurrency 1 and 32, paper model only

The clients need httpx2 (in satic's test extra, not its serve extra).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from satic.captioner import Captioner
from satic.config import configs_dir, load_config
from satic.data.vocab import Vocabulary
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_call
from satic.io import write_json
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import read_checkpoint_config, save_checkpoint
from satic.training.config import TrainConfig, check_model_section

REGIONS, DIM = 36, 2048
COCO_WORDS = 9487  # the paper's vocabulary
PAPER = ModelConfig(vocab_size=COCO_WORDS, group_size=2)  # ModelConfig's defaults: 6 layers, 512, 2048, 8 heads
# the demo's model (configs/demo: 2 layers, d_model 128, d_ff 256, 4 heads) with 50 words
DEMO = check_model_section(load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml").model,
                           vocab_size=50, att_feat_size=DIM)
DEMO_STAGES = {1: "teacher_scst", 2: "sat_k2_scst", 4: "sat_k4_scst"}
MAX_WAIT_MS = 5.0
MAX_BATCH = 32


def random_checkpoint(folder: Path, name: str, seed: int, config: ModelConfig) -> Path:
    torch.manual_seed(seed)
    model = SATModel(config).eval()
    words = Vocabulary(tuple(f"w{i}" for i in range(1, config.vocab_size + 1)))
    return save_checkpoint(folder / name, model, words)


def make_models(folder: Path, demo_run: Path | None, quick: bool) -> dict[str, Path]:
    models = {"paper-k2": random_checkpoint(folder, "paper-k2", 0, PAPER)}
    if quick:
        return models
    for k, stage in DEMO_STAGES.items():
        name = f"demo-k{k}"
        models[name] = (demo_run / stage / "best" if demo_run
                        else random_checkpoint(folder, name, k, dataclasses.replace(DEMO, group_size=k)))
    return models


def request_bodies(dim: int, count: int = 8) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [json.dumps({"features": [rng.standard_normal((REGIONS, dim)).astype(np.float32).tolist()]}).encode()
            for _ in range(count)]


def one_batch_decode_seconds(path: Path, threads: int) -> float:
    """Best of 3 decodes of 32 images (36 regions) by the paper-size model, after one untimed, in this
    process with the same threads as the server."""
    torch.set_num_threads(threads)
    captioner = Captioner.load(path)
    feats = torch.randn(MAX_BATCH, REGIONS, captioner.feature_dim)
    options = captioner.options()
    return time_call(lambda: captioner.decode(feats, None, options), passes=3, warm_up=1).value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`satic serve` in a child process, holding every model."""

    def __init__(self, models: dict[str, Path], max_batch: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        specs = [a for name, path in models.items() for a in ("--checkpoint", f"{name}={path}")]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "satic", "serve", *specs, "--port", str(self.port), "--max-batch", str(max_batch),
             "--max-wait-ms", str(MAX_WAIT_MS), "--threads", str(threads), "--log-level", "warning"],
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx2

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"satic serve exited with {self.process.returncode}")
            try:
                if httpx2.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx2.TransportError:
                time.sleep(0.2)
        raise SystemExit(f"satic serve did not answer within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


@dataclass
class Cell:
    requests: int
    seconds: float
    latencies: list[float]
    words: float  # mean caption length

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))


async def load(url: str, model: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float) -> Cell:
    """`concurrency` clients, each sending its next request as soon as its last is answered."""
    import httpx2

    latencies: list[float] = []
    words: list[int] = []
    sent = 0
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bodies = [b[:-1] + f', "model": "{model}"}}'.encode() for b in bodies]
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        start = time.perf_counter()

        async def client_loop() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() - start < seconds:
                body = bodies[sent % len(bodies)]
                sent += 1
                began = time.perf_counter()
                answer = await client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
                if answer.status_code != 200:
                    raise SystemExit(f"{model}: HTTP {answer.status_code}: {answer.text}")
                latencies.append(time.perf_counter() - began)
                words.append(len(answer.json()["captions"][0].split()))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return Cell(len(latencies), elapsed, latencies, statistics.fmean(words))


def run_cells(server: Server, models: dict[str, Path], concurrencies: list[int], requests: int, seconds: float
              ) -> dict[tuple[str, int], Cell]:
    out = {}
    for model, path in models.items():
        bodies = request_bodies(read_checkpoint_config(path)["model"]["att_feat_size"])  # the model's feature size
        for concurrency in concurrencies:
            asyncio.run(load(server.url, model, bodies, concurrency, 2 * concurrency, seconds))  # warm-up
            cell = asyncio.run(load(server.url, model, bodies, concurrency, max(requests, 2 * concurrency), seconds))
            out[model, concurrency] = cell
            print(f"  {model} c={concurrency}: {cell.rps:.1f} req/s, p50 {cell.percentile(50) * 1e3:.0f} ms, "
                  f"p99 {cell.percentile(99) * 1e3:.0f} ms ({cell.requests} requests)", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, help="timed requests per cell (at least 2 x concurrency; "
                                                     "default 96, 64 with --quick)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time limit per cell")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the server's CPU threads")
    parser.add_argument("--demo-run", type=Path, help="a `satic demo` output: its trained SCST models instead of "
                                                      "random demo-size ones")
    parser.add_argument("--quick", action="store_true", help="paper model only, concurrency 1 and 32, 64 requests "
                        "(unless --requests)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if args.quick and args.demo_run:
        parser.error("--demo-run: --quick measures the paper-size model only")
    if importlib.util.find_spec("httpx2") is None:  # before the models and servers, not after
        raise SystemExit("serve_load.py needs httpx2 for its clients: pip install 'httpx2>=2'")
    concurrencies = [1, 32] if args.quick else [1, 8, 32]
    requests = args.requests or (64 if args.quick else 96)
    with tempfile.TemporaryDirectory(prefix="satic-serve-load-") as tmp:
        models = make_models(Path(tmp), args.demo_run, args.quick)
        decode32 = [one_batch_decode_seconds(models["paper-k2"], args.threads)]
        results = {}
        for mode, max_batch in (("dynamic", MAX_BATCH), ("serial", 1)):
            print(f"{mode} (--max-batch {max_batch}):", file=sys.stderr)
            server = Server(models, max_batch, args.threads)
            try:
                server.wait_ready()
                results[mode] = run_cells(server, models, concurrencies, requests, args.seconds)
            finally:
                server.stop()
        decode32.append(one_batch_decode_seconds(models["paper-k2"], args.threads))  # a shared machine: best of both
    print(f"one {MAX_BATCH}-image decode, paper-size K=2: " + ", ".join(f"{s * 1e3:.0f}" for s in decode32) + " ms",
          file=sys.stderr)
    report(results, models, concurrencies, min(decode32), args)


def report(results: dict, models: dict, concurrencies: list[int], decode32: float, args) -> None:
    rows = []
    for model in models:
        for c in concurrencies:
            for mode in ("dynamic", "serial"):
                cell = results[mode][model, c]
                ratio = cell.rps / results["serial"][model, c].rps
                rows.append([model, str(c), mode, f"{cell.rps:.1f}", f"{cell.percentile(50) * 1e3:.0f}",
                             f"{cell.percentile(99) * 1e3:.0f}", f"{cell.words:.1f}",
                             f"{ratio:.2f}x" if mode == "dynamic" else ""])
    header = ["model", "concurrency", "batching", "requests/s", "p50 ms", "p99 ms", "words", "dynamic/serial req/s"]
    print(text_table(header, rows, "lrl" + "r" * 5, markdown=True))
    dynamic, serial = results["dynamic"]["paper-k2", 32], results["serial"]["paper-k2", 32]
    speedup = dynamic.rps / serial.rps
    bound = 2 * decode32 + MAX_WAIT_MS / 1000
    print()
    print(f"paper-size K=2, concurrency 32: dynamic batching gives {speedup:.2f}x the requests/s of serial "
          f"batch-1 serving")
    print(f"paper-size K=2, concurrency 32: p99 {dynamic.percentile(99) * 1e3:.0f} ms = "
          f"{dynamic.percentile(99) / bound:.2f} x (2 x one {MAX_BATCH}-image decode {decode32 * 1e3:.0f} ms "
          f"+ {MAX_WAIT_MS:.0f} ms)")
    if args.json:
        write_json(args.json, {
            "decode32_s": decode32, "speedup": speedup, "p99_over_bound": dynamic.percentile(99) / bound,
            "cells": {f"{mode}/{model}/{c}": {"rps": cell.rps, "p50_s": cell.percentile(50),
                                              "p99_s": cell.percentile(99), "requests": cell.requests}
                      for mode, cells in results.items() for (model, c), cell in cells.items()}})


if __name__ == "__main__":
    main()
