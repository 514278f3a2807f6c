"""Decoding latency of the SAT model: our cached decoder against the reference's way (re-run the whole
prefix every step), for K = 1, 2, 4, greedy and beam 3, batch 1 and 50, fp32 and int8/bf16.

Paper-size model (6 layers, d_model 512, d_ff 2048, 9487 words) with random weights; 36 regions x 2048;
EOS is suppressed so every caption has the full 20 words. At batch 1 a step is bound by reading the
decoder weights once, so each step is also compared with that floor (bytes / measured read bandwidth).

    python benchmarks/decode_latency.py            # full table (minutes)
    python benchmarks/decode_latency.py --quick    # two repeats, batch 1 and 10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from satic.decoding import DecodeOptions, decode, prepare_for_inference
from satic.io import atomic_path
from satic.model import ModelConfig, SATModel

GOALS = {"naive/ours fp32 batch 1": 2.0, "naive/ours fp32 big batch": 3.0, "K=2 speed-up (batch 1)": 1.85,
         "K=4 speed-up (batch 1)": 3.3, "naive fp32/ours reduced (batch 1)": 4.0}


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Best of a few full reads of a buffer much larger than the caches (GB/s)."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def step_weight_bytes(model: nn.Module) -> int:
    """Bytes a decoding step must read: decoder layers (without the regions' key/value projection,
    done once per image), final norm and generator."""
    total = 0
    for name, module in model.named_modules():
        if not (name.startswith("decoder") or name == "generator") or name.endswith("cross_attn.kv"):
            continue
        tensors = list(module.parameters(recurse=False))
        if callable(getattr(module, "weight", None)):  # dynamically quantized Linear: int8 weight + fp32 bias
            tensors += [module.weight().int_repr(), module.bias()]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def timed(runs: dict[str, tuple[nn.Module, bool]], feats: torch.Tensor, options: DecodeOptions, repeats: int):
    """{name: (best ms per image, result)} for decode runs {name: (model, use_cache)}. The runs are
    interleaved and the best of `repeats` is kept, so load from other processes hits them alike."""
    best = {name: float("inf") for name in runs}
    results = {}
    for name, (model, use_cache) in runs.items():  # warm-up
        results[name] = decode(model, feats, None, options, use_cache=use_cache)
    for _ in range(repeats):
        for name, (model, use_cache) in runs.items():
            start = time.perf_counter()
            decode(model, feats, None, options, use_cache=use_cache)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name] * 1000 / feats.size(0), results[name]) for name in runs}


def encode_ms(model: nn.Module, feats: torch.Tensor, repeats: int) -> float:
    """Best time of the once-per-image work: encoder and the regions' cross-attention keys/values."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            memory, _ = model.encode(feats)
            model.memory_kv(memory)
            best = min(best, time.perf_counter() - start)
    return best * 1000


def models_for(k: int, base: SATModel, precision: str) -> tuple[SATModel, SATModel]:
    model = SATModel(dataclasses.replace(base.config, group_size=k))
    model.load_state_dict(base.state_dict())
    model.eval()
    return model, prepare_for_inference(model, precision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two repeats, batch sizes 1 and 10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-batch", type=int, default=50)
    parser.add_argument("--precision", choices=["int8", "bf16"], default="int8", help="the reduced-precision mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--groups", default="1,2,4", help="group sizes K to measure")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    repeats, big = (2, 10) if args.quick else (args.repeats, args.big_batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = SATModel(ModelConfig(vocab_size=9487)).eval()
    with torch.no_grad():
        base.generator.bias[0] = -1e4  # no early EOS: every caption is 20 words
    feats = {b: torch.randn(b, 36, 2048, generator=torch.Generator().manual_seed(b)) for b in (1, big)}
    bandwidth = read_bandwidth_gbs()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s", flush=True)
    rows, summary = [], {}
    header = (f"{'K':>2} {'search':<7} {'batch':>5} {'naive ms/img':>12} {'ours ms/img':>11} {'x naive':>7} "
              f"{args.precision + ' ms/img':>11} {'x naive':>7} {'same caps':>9} {args.precision + ' agree':>10}")
    print(header, flush=True)
    for k in [int(x) for x in args.groups.split(",")]:
        model, reduced = models_for(k, base, args.precision)
        for beam in (1, 3):
            options = DecodeOptions(beam_size=beam, max_length=20)
            for batch in (1, big):
                runs = timed({"naive": (model, False), "ours": (model, True), "reduced": (reduced, True)},
                             feats[batch], options, repeats)
                (naive, naive_result), (ours, result), (fast, fast_result) = runs["naive"], runs["ours"], runs["reduced"]
                row = dict(K=k, search="greedy" if beam == 1 else "beam3", batch=batch, naive_ms=naive, ours_ms=ours,
                           reduced_ms=fast, same=bool(torch.equal(result.seq, naive_result.seq)),
                           reduced_agree=float((fast_result.seq == result.seq).float().mean()))
                rows.append(row)
                print(f"{k:>2} {row['search']:<7} {batch:>5} {naive:>12.1f} {ours:>11.1f} {naive / ours:>7.2f} "
                      f"{fast:>11.1f} {naive / fast:>7.2f} {str(row['same']):>9} {row['reduced_agree']:>10.3f}", flush=True)
        steps = 20 // k
        greedy1 = next(r for r in rows if r["K"] == k and r["search"] == "greedy" and r["batch"] == 1)
        for label, net, ms in (("fp32", model, greedy1["ours_ms"]), (args.precision, reduced, greedy1["reduced_ms"])):
            enc = encode_ms(net, feats[1], repeats)
            step_ms = (ms - enc) / steps
            floor_ms = step_weight_bytes(net) / bandwidth / 1e6
            summary[f"K={k} {label} step"] = dict(encode_ms=enc, step_ms=step_ms, floor_ms=floor_ms)
            print(f"   K={k} {label}: encoder {enc:.1f} ms, {steps} steps of {step_ms:.2f} ms; weight-streaming floor "
                  f"{floor_ms:.2f} ms/step ({floor_ms / step_ms:.0%} of floor reached)", flush=True)

    def pick(k, search, batch, key):
        return next(r[key] for r in rows if r["K"] == k and r["search"] == search and r["batch"] == batch)

    checks = {}
    for search in ("greedy", "beam3"):
        checks[f"naive/ours fp32 batch 1 {search}"] = min(pick(k, search, 1, "naive_ms") / pick(k, search, 1, "ours_ms") for k in (1, 2, 4) if any(r["K"] == k for r in rows))
        checks[f"naive/ours fp32 big batch {search}"] = min(pick(k, search, big, "naive_ms") / pick(k, search, big, "ours_ms") for k in (1, 2, 4) if any(r["K"] == k for r in rows))
        checks[f"naive fp32/ours reduced (batch 1) {search}"] = min(pick(k, search, 1, "naive_ms") / pick(k, search, 1, "reduced_ms") for k in (1, 2, 4) if any(r["K"] == k for r in rows))
        for k in (2, 4):
            if any(r["K"] == k for r in rows) and any(r["K"] == 1 for r in rows):
                checks[f"K={k} speed-up (batch 1) {search}"] = pick(1, search, 1, "ours_ms") / pick(k, search, 1, "ours_ms")
    print("\ngoal checks (worst case over K where several apply):")
    for name, value in checks.items():
        goal = next(g for prefix, g in GOALS.items() if name.startswith(prefix))
        print(f"  {name:<45} {value:6.2f}x  (goal >= {goal}x: {'met' if value >= goal else 'NOT met'})")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(dict(rows=rows, steps=summary, checks=checks, bandwidth_gbs=bandwidth,
                                           threads=torch.get_num_threads(), torch=torch.__version__), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
