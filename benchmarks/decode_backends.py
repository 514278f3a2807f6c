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
import os
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="satic-inductor-"))  # a cold compile

import torch  # noqa: E402

from satic.decoding import DecodeOptions, Decoder, decode  # noqa: E402
from satic.evaluation.timing import time_calls  # noqa: E402
from satic.model import ModelConfig, SATModel  # noqa: E402

SIZES = {"demo": dict(vocab_size=100, num_layers=2, d_model=128, d_ff=256, num_heads=4, max_positions=64),
         "paper": dict(vocab_size=9487)}
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
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SATModel(ModelConfig(group_size=args.k, **SIZES[args.size])).eval()
    with torch.no_grad():
        model.generator.bias[0] = -1e4  # no early EOS: a caption runs ceil(max_length / K) steps
    feats = torch.randn(1, args.regions, model.config.att_feat_size, generator=torch.Generator().manual_seed(1))
    options = {n: DecodeOptions(max_length=n) for n in LENGTHS}
    steps = {n: -(-n // args.k) for n in LENGTHS}
    names = args.backends.split(",")
    decoders, first = {}, {}
    for name in names:
        decoders[name] = Decoder.prepare(model, args.precision, compile=name)
        start = time.perf_counter()
        decode(decoders[name], feats, None, options[LENGTHS[0]])  # records (compiles) the step for this shape
        first[name] = time.perf_counter() - start
        decode(decoders[name], feats, None, options[LENGTHS[1]])  # the other length's cache shape, untimed
    calls = {(name, n): (lambda d=decoders[name], o=options[n]: decode(d, feats, None, o))
             for name in names for n in LENGTHS}
    timings = time_calls({f"{name} {n}": fn for (name, n), fn in calls.items()}, passes=args.repeats)
    expected = timings[f"eager {LENGTHS[1]}"].output.seq if "eager" in names else None
    c = model.config
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.precision} {args.size} size (layers "
          f"{c.num_layers}, d_model {c.d_model}, d_ff {c.d_ff}, {c.vocab_size} words), K={args.k}, batch 1 greedy, "
          f"{args.regions} regions; best of {args.repeats} interleaved")
    print(f"{'backend':<12} {'first s':>8} {'ms/caption (' + str(LENGTHS[0]) + ')':>17} {'fixed ms':>9} "
          f"{'ms/step':>8} {'same':>5}")
    for name in names:
        short, long = (timings[f"{name} {n}"].value * 1000 for n in LENGTHS)
        per_step = (long - short) / (steps[LENGTHS[1]] - steps[LENGTHS[0]])
        fixed = short - steps[LENGTHS[0]] * per_step
        same = expected is None or torch.equal(timings[f"{name} {LENGTHS[1]}"].output.seq, expected)
        compile_s = first[name] - short / 1000
        print(f"{name:<12} {compile_s:>8.2f} {short:>17.3f} {fixed:>9.3f} {per_step:>8.3f} {str(same):>5}", flush=True)
    print("first s: the first caption's seconds beyond a steady one (recording or compiling the step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
