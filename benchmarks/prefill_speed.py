"""The prefill of a batch of images (encoder, final norm, every decoder layer's region keys/values, padded
to the region bucket): the native op (`csrc/encoder.cpp`, what a recorded fp32 CPU Decoder runs) against
the model's own encode + memory_kv (whose linear layers over many rows are torch's GEMM), in one run,
interleaved; random weights.

    python benchmarks/prefill_speed.py                  # demo and paper size, 10..100 regions, batch 1
    python benchmarks/prefill_speed.py --size demo --feature-size 128    # `satic demo`'s features
    python benchmarks/prefill_speed.py --regions 36 --batch 1,2,4,8,32 --threads 2   # batches, 2 threads
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from satic.config import configs_dir, load_config
from satic.decoding import Decoder
from satic.decoding.engine import native_encoder_weights, pad_regions
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_calls
from satic.model import ModelConfig, SATModel
from satic.training.config import TrainConfig, check_model_section

COCO_WORDS = 9487  # the paper's vocabulary
# the demo's model (configs/demo: 2 layers, d_model 128) with 100 words; ModelConfig's defaults are the paper's size
SIZES = {"demo": check_model_section(load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml").model,
                                     vocab_size=100, att_feat_size=2048),
         "paper": ModelConfig(vocab_size=COCO_WORDS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both")
    parser.add_argument("--feature-size", type=int, default=2048, help="region feature size")
    parser.add_argument("--regions", default="10,22,36,64,100")
    parser.add_argument("--batch", default="1", help="images per prefill, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch's threads")
    parser.add_argument("--passes", type=int, default=5, help="timed passes; each keeps its best")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for size in SIZES if args.size == "both" else [args.size]:
        model = SATModel(dataclasses.replace(SIZES[size], group_size=2, att_feat_size=args.feature_size)).eval()
        decoder = Decoder.prepare(model, "fp32", compile=True)
        fast = decoder.model
        if native_encoder_weights(fast) is None:
            raise SystemExit("the native prefill needs the small-row kernel (a C++ compiler and AVX2)")
        shapes = [(r, b) for r in map(int, args.regions.split(",")) for b in map(int, args.batch.split(","))]
        for regions, batch in shapes:
            feats = torch.randn(batch, regions, args.feature_size)
            repeats = max(1, (3 if size == "paper" else 100) // batch)

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
            rows.append([size, str(regions), str(batch), f"{ms['eager']:.3f}", f"{ms['native']:.3f}",
                         f"{ms['eager'] / ms['native']:.2f}x", f"{error:.1e}"])
    print(f"{args.threads} thread(s); ms per prefill of the whole batch")
    print(text_table(["size", "regions", "batch", "eager ms", "native ms", "speed-up", "max |diff|"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
