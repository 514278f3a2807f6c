"""The prefill of one image (encoder, final norm, every decoder layer's region keys/values, padded to the
region bucket) at batch 1: the native op (`csrc/encoder.cpp`, what a recorded fp32 CPU Decoder runs)
against the model's own encode + memory_kv, in one run, interleaved, on one thread; random weights.

    python benchmarks/prefill_speed.py                  # demo and paper size, 10..100 regions
    python benchmarks/prefill_speed.py --size demo --feature-size 128    # `satic demo`'s features
"""
from __future__ import annotations

import argparse

import torch

from satic.decoding import Decoder
from satic.decoding.engine import native_encoder_weights, pad_regions
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_calls
from satic.model import ModelConfig, SATModel

SIZES = {"demo": dict(vocab_size=100, num_layers=2, d_model=128, d_ff=256, num_heads=4, max_positions=64),
         "paper": dict(vocab_size=9487)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both")
    parser.add_argument("--feature-size", type=int, default=2048, help="region feature size")
    parser.add_argument("--regions", default="10,22,36,64,100")
    parser.add_argument("--passes", type=int, default=5, help="timed passes; each keeps its best")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for size in SIZES if args.size == "both" else [args.size]:
        model = SATModel(ModelConfig(group_size=2, att_feat_size=args.feature_size, **SIZES[size])).eval()
        decoder = Decoder.prepare(model, "fp32", compile=True)
        fast = decoder.model
        if native_encoder_weights(fast) is None:
            raise SystemExit("the native prefill needs the small-row kernel (a C++ compiler and AVX2)")
        repeats = 3 if size == "paper" else 100
        for regions in map(int, args.regions.split(",")):
            feats = torch.randn(1, regions, args.feature_size)

            def native(feats=feats):
                for _ in range(repeats):
                    out = decoder._prefill(feats, None)
                return out

            def eager(feats=feats):
                for _ in range(repeats):
                    memory, bias = fast.encode(feats, None)
                    out = pad_regions(fast.memory_kv(memory, bias), bias)
                return out

            with torch.no_grad():
                timings = time_calls({"native": native, "eager": eager}, args.passes)
            (kv, _), (kv_eager, _) = timings["native"].output, timings["eager"].output
            error = max(float((a - b).abs().max()) for pa, pb in zip(kv, kv_eager) for a, b in zip(pa, pb))
            ms = {name: t.value / repeats * 1e3 for name, t in timings.items()}
            rows.append([size, str(regions), f"{ms['eager']:.3f}", f"{ms['native']:.3f}", f"{ms['eager'] / ms['native']:.2f}x",
                         f"{error:.1e}"])
    print(text_table(["size", "regions", "eager ms", "native ms", "speed-up", "max |diff|"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
