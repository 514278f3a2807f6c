"""GET /v1/models says what each model reads; GET /metrics counts what the server did, in the Prometheus
text format; an ensemble is served as one model."""
from __future__ import annotations

import argparse
import concurrent.futures
import re

import numpy as np
import pytest

from satic.captioner import Captioner
from satic.cli.serve import checkpoint_spec, default_max_regions, load_models
from satic.data.vocab import Vocabulary
from satic.model.checkpoint import save_checkpoint

from serve_helpers import DIM, WORDS, load, regions, serving, tiny_model

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value}, checking the exposition format: each sample's family was declared with
    # HELP and # TYPE before it, and every value is a number."""
    declared, samples = set(), {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            declared.add(line.split()[2])
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in declared or family in declared, line
        samples[name + (labels or "")] = float(value)
    return samples


def test_models_say_what_each_model_reads(captioners):
    with serving(captioners) as client:
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert list(listed) == list(captioners)
    for name, captioner in captioners.items():
        info = listed[name]
        assert info["group_size"] == captioner.config.group_size and info["vocab_size"] == len(captioner.vocab)
        assert (info["feature_kind"], info["feature_dim"]) == (captioner.features.kind, captioner.feature_dim)
        assert info["takes_images"] == (captioner.features.kind == "grid")
        assert info["max_length"] == captioner.options(1).max_length and info["precision"] == "fp32"
        assert info["longest_max_length"] == 64  # max_positions 64: 32 groups of K=2, 64 of K=1
    assert listed["tiny"]["feature_dim"] == DIM


def test_metrics_count_requests_images_and_batches(captioners):
    tiny = captioners["tiny"]
    requests = [{"features": [f.tolist() for f in regions(np.random.default_rng(i), 2)]} for i in range(3)]
    with serving({"tiny": tiny}, max_batch=8, max_wait_ms=2000, max_body_bytes=50_000) as client:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # one batch of all 6 images
            answers = list(pool.map(lambda body: client.post("/v1/captions", json=body), requests))
        assert [a.status_code for a in answers] == [200] * 3
        assert client.post("/v1/captions", json={"features": "x"}).status_code == 400
        assert client.post("/v1/captions", json={**requests[0], "model": "nope"}).status_code == 404
        assert client.post("/v1/captions", content=b" " * 60_000,
                           headers={"content-type": "application/json"}).status_code == 413
        reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = parse_metrics(reply.text)
    assert {k: v for k, v in metrics.items() if k.startswith("satic_requests_total")} == {
        'satic_requests_total{status="200"}': 3, 'satic_requests_total{status="400"}': 1,
        'satic_requests_total{status="404"}': 1, 'satic_requests_total{status="413"}': 1}
    assert metrics['satic_images_total{model="tiny"}'] == 6
    durations = [v for k, v in metrics.items() if k.startswith('satic_request_duration_seconds_bucket{model="tiny"')]
    assert durations == sorted(durations) and durations[-1] == 3  # cumulative; +Inf holds every request
    assert metrics['satic_request_duration_seconds_count{model="tiny"}'] == 3
    assert 0 < metrics['satic_request_duration_seconds_sum{model="tiny"}'] < 60
    assert metrics['satic_batch_images_bucket{model="tiny",le="4.0"}'] == 0
    assert metrics['satic_batch_images_bucket{model="tiny",le="8.0"}'] == 1
    assert (metrics['satic_batch_images_sum{model="tiny"}'] == 6
            and metrics['satic_batch_images_count{model="tiny"}'] == 1)
    assert metrics['satic_batch_duration_seconds_count{model="tiny"}'] == 1
    assert metrics["satic_queue_images"] == 0 and metrics["satic_start_time_seconds"] > 1.7e9
    assert metrics["satic_worker_busy"] == 0


def test_a_model_name_is_escaped_in_labels():
    from satic.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    metrics.request(200, 0.002, 'a"b\\c', images=1)
    text = metrics.render()
    assert 'satic_images_total{model="a\\"b\\\\c"} 1' in text
    assert parse_metrics(text)['satic_request_duration_seconds_bucket{model="a\\"b\\\\c",le="0.0025"}'] == 1


def test_an_ensemble_is_served_as_one_model(tiny_checkpoint, tmp_path, capsys):
    """--checkpoint NAME=DIR,DIR: the checkpoints averaged as one model, as `satic eval` does with several."""
    other = save_checkpoint(tmp_path / "other", tiny_model(5, 2), Vocabulary(WORDS))
    name, directories = checkpoint_spec(f"pair={tiny_checkpoint},{other}")
    assert (name, directories) == ("pair", [tiny_checkpoint, other])
    comma = tmp_path / "a,b"
    comma.mkdir()
    assert checkpoint_spec(str(comma)) == ("a,b", [comma])  # an existing folder is taken whole
    with pytest.raises(argparse.ArgumentTypeError, match="name an ensemble"):
        checkpoint_spec(f"{tiny_checkpoint},{other}")

    models = load_models([(name, directories)], "fp32", "cpu")
    assert "model 'pair': K=2, bottom-up features of 8, an ensemble of 2" in capsys.readouterr().err
    feats = regions(np.random.default_rng(3), 3)
    with serving(models) as client:
        info = client.get("/v1/models").json()["models"][0]
        answer = client.post("/v1/captions", json={"features": [f.tolist() for f in feats], "beam_size": 2})
    assert info["name"] == "pair" and info["ensemble_weights"] == [1.0, 1.0]
    expected = Captioner.load([tiny_checkpoint, other]).caption(feats, beam_size=2)
    assert answer.json()["captions"] == expected
    assert expected != Captioner.load(tiny_checkpoint).caption(feats, beam_size=2)


def test_the_region_limit_admits_a_grid_models_own_features(captioners, grid_checkpoint, tmp_path):
    """--max-regions defaults to 1024, or a grid model's region count where its extractor makes more."""
    import json

    assert default_max_regions(captioners) == 1024  # the tiny grid model makes 2 x 2
    config = json.loads((grid_checkpoint / "config.json").read_text())
    config["features"]["extractor"]["size"] = 2048  # 64 x 64 regions
    large = tmp_path / "large"
    large.mkdir()
    (large / "config.json").write_text(json.dumps(config))
    (large / "model.safetensors").symlink_to(grid_checkpoint / "model.safetensors")
    assert default_max_regions({"large": load(large, "large"), **captioners}) == 4096


def test_metrics_render_every_bucket_of_each_histogram_cumulatively():
    """Request and batch durations in the 13 buckets from 1 ms to 10 s, batch sizes in powers of two up to 256;
    a value on a bound counts in that bound's bucket, one past the last bound only in +Inf."""
    import time

    from satic.serve.metrics import ServeMetrics

    before = time.time()
    metrics = ServeMetrics()
    after = time.time()
    metrics.request(200, 0.003, "m")  # no images given: none counted
    metrics.request(200, 0.025, "m", images=2)
    metrics.request(200, 11.0, "m", images=1)
    metrics.request(503, 0.5)
    metrics.batch("m", 3, 0.001)
    metrics.batch("m", 257, 0.2)
    samples = parse_metrics(metrics.render())

    def buckets(name):
        prefix = f'{name}_bucket{{model="m",le="'
        return {k[len(prefix):-2]: v for k, v in samples.items() if k.startswith(prefix)}

    durations = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0",
                 "10.0", "+Inf"]
    assert buckets("satic_request_duration_seconds") == dict(zip(durations, [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3]))
    assert samples['satic_request_duration_seconds_sum{model="m"}'] == 0.003 + 0.025 + 11.0
    assert samples['satic_request_duration_seconds_count{model="m"}'] == 3
    assert buckets("satic_batch_duration_seconds") == dict(zip(durations, [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]))
    sizes = ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "+Inf"]
    assert buckets("satic_batch_images") == dict(zip(sizes, [0, 0, 1, 1, 1, 1, 1, 1, 1, 2]))
    assert (samples['satic_batch_images_sum{model="m"}'], samples['satic_batch_images_count{model="m"}']) == (260, 2)
    for size in (1, 2, 16, 32, 64, 128, 256):
        one = ServeMetrics()
        one.batch("m", size, 0.01)
        counts = parse_metrics(one.render())
        assert counts[f'satic_batch_images_bucket{{model="m",le="{float(size)}"}}'] == 1, size
        if size > 1:
            assert counts[f'satic_batch_images_bucket{{model="m",le="{float(size // 2)}"}}'] == 0, size
    assert {k: v for k, v in samples.items() if not k.startswith(("satic_request_duration", "satic_batch"))} == {
        'satic_requests_total{status="200"}': 3, 'satic_requests_total{status="503"}': 1,
        'satic_images_total{model="m"}': 3, 'satic_connection_timeouts_total{kind="header"}': 0,
        'satic_connection_timeouts_total{kind="send"}': 0, "satic_queue_images": 0, "satic_worker_busy": 0,
        "satic_start_time_seconds": samples["satic_start_time_seconds"]}
    assert before <= samples["satic_start_time_seconds"] <= after
    shown = ServeMetrics(queued_images=lambda: 7, busy=lambda: True).render().splitlines()
    assert "satic_queue_images 7" in shown and "satic_worker_busy 1" in shown
