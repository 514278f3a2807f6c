"""Where a batch-1 caption's time goes on a GPU: wall time against the GPU's busy time and the number of
kernels it ran, for the recorded decoder (CUDA graphs), fp32 and bf16, greedy and beam 3.

If busy time is near wall time the GPU is the limit (fewer or fused kernels help); if far below, the
host is (fewer host operations per step help). Paper-size model, random weights, 36 regions, 20 words.

    python benchmarks/decode_profile.py [--groups 1,2,4] [--repeats 20]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from satic.decoding import DecodeOptions, Decoder, decode, start
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_call
from satic.model import ModelConfig, SATModel

COCO_WORDS = 9487  # the paper's vocabulary; ModelConfig's defaults are the paper's size


def wall_ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() after an untimed call, with the GPU drained before and after each."""
    return time_call(fn, passes=repeats, statistic="median", device="cuda").value * 1000


def kernel_profile(fn, repeats: int) -> tuple[float, float, Counter]:
    """(GPU kernel ms per call, kernels per call, kernel name -> total µs) over `repeats` calls."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: Counter = Counter()
    for e in kernels:
        by_name[e.name[:70]] += e.time_range.elapsed_us()
    return sum(by_name.values()) / 1000 / repeats, len(kernels) / repeats, by_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_profile.py needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    base = SATModel(ModelConfig(vocab_size=COCO_WORDS)).eval()
    with torch.no_grad():
        base.generator.bias[0] = -1e4  # every caption has 20 words
    feats = torch.randn(1, 36, 2048, generator=torch.Generator().manual_seed(1)).cuda()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; batch 1, 36 regions, 20 words, median of "
          f"{args.repeats}")
    groups = [int(x) for x in args.groups.split(",")]
    top_k = 2 if 2 in groups else groups[0]  # whose kernels are listed at the end
    rows, top = [], Counter()
    for k in groups:
        model = SATModel(dataclasses.replace(base.config, group_size=k))
        model.load_state_dict(base.state_dict())
        model = model.cuda().eval()
        for precision in ("fp32", "bf16"):
            net = Decoder.prepare(model, precision, compile=True)
            for beam in (1, 3):
                options = DecodeOptions(beam_size=beam, max_length=20)
                run = lambda: decode(net, feats, None, options)  # noqa: E731
                run()  # records the graphs
                with torch.no_grad():
                    prefill = wall_ms(lambda: start(net, feats, None, beam, 20), args.repeats)
                wall = wall_ms(run, args.repeats)
                busy, count, by_name = kernel_profile(run, args.repeats)
                if (k, precision, beam) == (top_k, "fp32", 1):
                    top = by_name
                rows.append([str(k), "greedy" if beam == 1 else "beam3", precision, f"{wall:.2f}", f"{busy:.2f}",
                             f"{count:.0f}", f"{prefill:.2f}"])
    header = ["K", "search", "precision", "wall ms", "GPU busy ms", "kernels", "prefill ms"]
    print(text_table(header, rows, "rll" + "r" * 4))
    total = sum(top.values())
    print(f"\nK={top_k} greedy fp32: the kernels that take the most GPU time")
    print(text_table(["share", "kernel"], [[f"{us / total:.1%}", name] for name, us in top.most_common(10)], "rl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
