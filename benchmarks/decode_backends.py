"""The decoding step's back-ends, measured in one run: eager, the native step (`csrc/decoder.cpp`, the
CPU default), TorchScript traces, torch.compile (inductor, default mode) and torch.export, all behind
`Decoder(compile=...)`.

For each back-end: the first caption's seconds (recording or compiling included; inductor's on-disk
cache is pointed at an empty folder, so it compiles cold), then per-caption, fixed (prefill and per-call
work) and per-step milliseconds at batch 1 greedy, and whether its captions equal eager's token for
token. Per-step and fixed costs come from two caption lengths: EOS is suppressed, so a caption of
max_length L runs ceil(L / K) steps; per step = (t(40) - t(10)) / (steps(40) - steps(10)); timed on
one thread (as `satic demo` times latency), compiled with whatever the machine has.

    python benchmarks/decode_backends.py                 # demo size (d_model 128, 2 layers), K=2
    python benchmarks/decode_backends.py --size paper    # 6 layers, d_model 512 (inductor: minutes)
    python benchmarks/decode_backends.py --size paper --precision int8 --backends native,torchscript

On CUDA the recorded back-end is CUDA graphs whatever is chosen here; torch.compile's
mode="reduce-overhead" (CUDA graph trees) would record the same graphs after an inductor compile, so
the step it replays is inductor's kernels instead of eager's; it is not measured here (no GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from unittest import mock

import torch

from satic.config import configs_dir, load_config
from satic.decoding import DecodeOptions, Decoder, decode
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_call, time_calls
from satic.model import ModelConfig, SATModel
from satic.training.config import TrainConfig, check_model_section

COCO_WORDS = 9487  # the paper's vocabulary
# the demo's model (configs/demo: 2 layers, d_model 128) with 100 words; ModelConfig's defaults are the paper's size
SIZES = {"demo": check_model_section(load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml").model,
                                     vocab_size=100, att_feat_size=2048),
         "paper": ModelConfig(vocab_size=COCO_WORDS)}
BACKENDS = ("eager", "native", "torchscript", "inductor", "export")
LENGTHS = (10, 40)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--k", type=int, default=2, help="group size K")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="weights (int8: CPU only)")
    args = parser.parse_args(argv)
    # inductor reads its cache folder when it compiles, not at import: an empty one, so it compiles cold
    with tempfile.TemporaryDirectory(prefix="satic-inductor-") as cache, \
            mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", cache)}):
        measure(args)
    return 0


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SATModel(dataclasses.replace(SIZES[args.size], group_size=args.k)).eval()
    with torch.no_grad():
        model.generator.bias[0] = -1e4  # no early EOS: a caption runs ceil(max_length / K) steps
    feats = torch.randn(1, args.regions, model.config.att_feat_size, generator=torch.Generator().manual_seed(1))
    options = {n: DecodeOptions(max_length=n) for n in LENGTHS}
    steps = {n: -(-n // args.k) for n in LENGTHS}
    names = args.backends.split(",")
    decoders, first = {}, {}
    for name in names:
        decoders[name] = decoder = Decoder.prepare(model, args.precision, compile=name)
        # the first call records (compiles) the step for this shape
        first[name] = time_call(lambda: decode(decoder, feats, None, options[LENGTHS[0]]), passes=1, warm_up=0).value
        decode(decoder, feats, None, options[LENGTHS[1]])  # the other length's cache shape, untimed
    calls = {(name, n): (lambda d=decoders[name], o=options[n]: decode(d, feats, None, o))
             for name in names for n in LENGTHS}
    timings = time_calls({f"{name} {n}": fn for (name, n), fn in calls.items()}, passes=args.repeats)
    expected = timings[f"eager {LENGTHS[1]}"].output.seq if "eager" in names else None
    c = model.config
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.precision} {args.size} size (layers "
          f"{c.num_layers}, d_model {c.d_model}, d_ff {c.d_ff}, {c.vocab_size} words), K={args.k}, batch 1 greedy, "
          f"{args.regions} regions; best of {args.repeats} interleaved")
    rows = []
    for name in names:
        short, long = (timings[f"{name} {n}"].value * 1000 for n in LENGTHS)
        per_step = (long - short) / (steps[LENGTHS[1]] - steps[LENGTHS[0]])
        fixed = short - steps[LENGTHS[0]] * per_step
        # without eager there is nothing to compare with
        same = "-" if expected is None else str(torch.equal(timings[f"{name} {LENGTHS[1]}"].output.seq, expected))
        compile_s = first[name] - short / 1000
        rows.append([name, f"{compile_s:.2f}", f"{short:.3f}", f"{fixed:.3f}", f"{per_step:.3f}", same])
    print(text_table(["backend", "first s", f"ms/caption ({LENGTHS[0]})", "fixed ms", "ms/step", "same"], rows))
    print("first s: the first caption's seconds beyond a steady one (recording or compiling the step)")


if __name__ == "__main__":
    raise SystemExit(main())
