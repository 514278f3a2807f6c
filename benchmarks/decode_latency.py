"""Decoding latency of the SAT model: our cached decoder (eager, and compiled: native calls on the CPU at
fp32 and int8, the step traced at bf16 or over 64 rows, CUDA graphs on a GPU) against the reference's
way (re-run the whole prefix every step), for K = 1, 2, 4, greedy and beam 3, batch 1 and 50, fp32 and
int8 (CPU) or bf16.

Paper-size model (6 layers, d_model 512, d_ff 2048, 9487 words) with random weights; 36 regions x 2048;
EOS is suppressed so every caption has the full 20 words. At batch 1 a step is bound by reading the
decoder weights once, so each step is also compared with that floor (bytes / measured read bandwidth).

    python benchmarks/decode_latency.py            # full table (minutes)
    python benchmarks/decode_latency.py --quick    # one timed run each, batch 1 and 10
    python benchmarks/decode_latency.py --device cuda --precision bf16
    python benchmarks/decode_latency.py --fixed-costs --before ../satic-old  # fixed vs per-step cost

--fixed-costs: batch 1 greedy with the compiled fp32 decoder, for the demo size (2 layers, d_model 128,
images of 10, 36, 64 and 100 regions) and the paper size (36 regions), K = 1, 2, 4: per step =
(t(20) - t(10)) / (steps(20) - steps(10)) and fixed = t(10) - steps(10) * per step, with EOS suppressed;
t(10) runs the ceil(10 / K) steps of a 9-word caption and its end (max_length 10 rounded up to whole
groups), and the speed-ups over K=1 are taken at that length and at 20 words. --before DIR also runs the same
measurement on the code in DIR/src (a git worktree of an older commit), in alternating rounds of
subprocesses of this script, so both see the same machine load.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import satic.decoding
from satic.config import configs_dir, load_config
from satic.decoding import DecodeOptions, decode, start
from satic.decoding.small_gemm import Int8WeightLinear, SmallRowLinear, load_kernel
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_call, time_calls
from satic.io import read_json, write_json
from satic.model import ModelConfig, SATModel
from satic.training.config import TrainConfig, check_model_section

def recorded(model: SATModel, precision: str, compile: bool = True, kernel: str = "auto"):
    """The compiled decoder: a Decoder, or (older code, for --before) the model prepared with trace=True."""
    if hasattr(satic.decoding, "Decoder"):
        return satic.decoding.Decoder.prepare(model, precision, compile=compile, kernel=kernel)
    return satic.decoding.prepare_for_inference(model, precision, trace=compile, kernel=kernel)


COCO_WORDS = 9487  # the paper's vocabulary
# the demo's model (configs/demo: 2 layers, d_model 128) with 100 words; ModelConfig's defaults are the paper's size
SIZES = {"demo": check_model_section(load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml").model,
                                     vocab_size=100, att_feat_size=2048),
         "paper": ModelConfig(vocab_size=COCO_WORDS)}
REGIONS = {"demo": (10, 36, 64, 100), "paper": (36,)}  # --fixed-costs: the images' region counts
LENGTHS = (10, 20)


def fixed_costs(repeats: int, groups: list[int], sizes: list[str]) -> dict:
    """{size: {K: {ms at each length, per step, fixed}}}: batch 1 greedy, the compiled fp32 decoder, one
    caption per region count (the mean over them)."""
    out = {}
    for size in sizes:
        torch.manual_seed(0)
        base = SATModel(SIZES[size]).eval()
        with torch.no_grad():
            base.generator.bias[0] = -1e4  # no early EOS
        images = [torch.randn(1, n, 2048, generator=torch.Generator().manual_seed(n)) for n in REGIONS[size]]
        out[size] = {}
        for k in groups:
            model = SATModel(dataclasses.replace(base.config, group_size=k))
            model.load_state_dict(base.state_dict())
            net = recorded(model.eval(), "fp32")
            lengths = {n: -(-n // k) * k for n in LENGTHS}  # whole groups: 10 -> 12 words at K=4 (3 steps)
            calls = {(n, i): (lambda f=f, o=DecodeOptions(max_length=lengths[n]): decode(net, f, None, o))
                     for n in LENGTHS for i, f in enumerate(images)}
            timings = time_calls({f"{n} {i}": fn for (n, i), fn in calls.items()}, passes=repeats)
            ms = {n: sum(timings[f"{n} {i}"].value for i in range(len(images))) / len(images) * 1000 for n in LENGTHS}
            out[size][k] = dict(ms=ms)
    return out


def best_of(runs: list[dict]) -> dict:
    """Entry-wise best (lowest ms) over rounds; per step and fixed recomputed from the best times."""
    out = {}
    for size, by_k in runs[0].items():
        out[size] = {}
        for k in by_k:
            ms = {n: min(r[size][k]["ms"][n] for r in runs) for n in runs[0][size][k]["ms"]}
            lengths = sorted(ms, key=int)  # JSON keys: strings
            steps = {n: -(-int(n) // int(k)) for n in lengths}  # greedy with EOS suppressed: ceil(n / K) steps
            per_step = (ms[lengths[1]] - ms[lengths[0]]) / (steps[lengths[1]] - steps[lengths[0]])
            out[size][k] = dict(ms=ms, per_step=per_step, fixed=ms[lengths[0]] - steps[lengths[0]] * per_step)
    return out


def compare_fixed_costs(before: Path | None, repeats: int, rounds: int, groups: str, threads: int, sizes: str,
                        json_path: Path | None = None) -> None:
    """Alternating subprocess rounds of --fixed-costs on this code and on before/src; prints both tables
    (and writes the best timings to json_path)."""
    versions = {"after": Path(__file__).resolve().parents[1] / "src"}
    if before is not None:
        versions = {"before": before.resolve() / "src", **versions}
    results: dict[str, list[dict]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, src in versions.items():
                out = Path(tmp) / f"{name}{r}.json"
                env = {**os.environ, "PYTHONPATH": str(src)}
                subprocess.run([sys.executable, __file__, "--fixed-costs-worker", "--json", str(out), "--groups",
                                groups, "--repeats", str(repeats), "--threads", str(threads), "--sizes", sizes],
                               env=env, check=True)
                results[name].append(read_json(out))
    best = {name: best_of(runs) for name, runs in results.items()}
    print(f"torch {torch.__version__}, {threads} thread(s); batch 1 greedy, compiled fp32 decoder, EOS suppressed; "
          f"best of {repeats} x {rounds} alternating rounds")
    rows = []
    for size in best["after"]:
        for k in best["after"][size]:
            for name in best:
                row, teacher = best[name][size][k], best[name][size][next(iter(best[name][size]))]
                speed = {n: teacher["ms"][n] / row["ms"][n] for n in row["ms"]}
                ms = (row["fixed"], row["per_step"], row["ms"]["10"], row["ms"]["20"])
                rows.append([size, str(k), name, *(f"{v:.3f}" for v in ms), f"{speed['10']:.2f}", f"{speed['20']:.2f}"])
    first = groups.split(",")[0]  # the speed-ups are over the first K measured
    header = ["size", "K", "version", "fixed ms", "ms/step", "ms (10)", "ms (20)", f"x K={first} (10)",
              f"x K={first} (20)"]
    print(text_table(header, rows, "lrl" + "r" * 6))
    if json_path:
        write_json(json_path, dict(best=best, threads=threads, repeats=repeats, rounds=rounds, torch=torch.__version__))


def read_bandwidth_gbs(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Best of a few full reads of a buffer much larger than the caches (GB/s); on a GPU a device copy,
    counting the bytes read and written."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=device)
    copy = torch.empty_like(buffer)
    read = (lambda: copy.copy_(buffer)) if device.type == "cuda" else buffer.sum
    best = time_call(read, passes=repeats, device=device).value
    return buffer.numel() * 4 * (2 if device.type == "cuda" else 1) / best / 1e9


def step_weight_bytes(model: nn.Module) -> int:
    """Bytes a decoding step must read: decoder layers (without the regions' key/value projection,
    done once per image), final norm and generator."""
    total = 0
    for name, module in model.named_modules():
        if not (name.startswith("decoder") or name == "generator") or name.endswith("cross_attn.kv"):
            continue
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, (SmallRowLinear, Int8WeightLinear)):  # the kernel reads the packed copy
            tensors += [module.packed, module.packed_bias, getattr(module, "scale", None)]
        if callable(getattr(module, "weight", None)):  # dynamically quantized Linear: int8 weight + fp32 bias
            tensors += [module.weight().int_repr(), module.bias()]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def peak_gflops(repeats: int = 5) -> float:
    """The best fp32 multiply rate this thread reaches: a large square GEMM, or the small-row kernel on an
    encoder-sized product held in cache, whichever is faster (GFLOP/s)."""
    def best(product, flops):
        return flops / time_call(product, passes=repeats).value / 1e9

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    rates = [best(lambda: a @ b, 2 * 1024 ** 3)]
    if load_kernel() is None:
        linear = SmallRowLinear(nn.Linear(2048, 512))
        x = torch.randn(48, 2048)
        rates.append(best(lambda: linear(x), 2 * 48 * 2048 * 512))
    return max(rates)


def linear_flops(model: nn.Module, rows: int, prefixes: tuple[str, ...]) -> int:
    """Multiply-adds x 2 of `rows` rows through every Linear whose name starts with one of `prefixes`."""
    return sum(2 * rows * m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.startswith(prefixes))


def decode_flops(model: SATModel, regions: int, k: int, beams: int, words: int, naive: bool) -> int:
    """FLOPs to caption one image with `words` words (beams rows, K words per step): the encoder, the regions'
    keys/values (every step for the naive decoder), the decoder over the new positions (the whole prefix
    for the naive one) and the generator over the new positions. Attention products included."""
    c = model.config
    encoder = (linear_flops(model, regions, ("region_embed", "encoder")) + c.num_layers * 4 * regions ** 2 * c.d_model)
    memory = linear_flops(model, regions, tuple(f"decoder_layers.{i}.cross_attn.kv" for i in range(c.num_layers)))
    per_token = (linear_flops(model, 1, ("decoder",)) - memory // regions + linear_flops(model, 1, ("generator",)))
    steps = words // k
    if not naive:
        attention = sum(4 * (regions + s * k) * c.d_model * c.num_layers * k for s in range(1, steps + 1))
        return encoder + memory + beams * (words * per_token + attention)
    generator = linear_flops(model, 1, ("generator",))
    total = encoder + steps * memory
    for s in range(1, steps + 1):
        prefix = s * k
        total += beams * (prefix * (per_token - generator) + k * generator
                          + 4 * (regions + prefix) * c.d_model * c.num_layers * prefix)
    return total


def timed(runs: dict[str, tuple[nn.Module, bool]], feats: torch.Tensor, options: DecodeOptions, repeats: int):
    """{name: (best ms per image, result)} for decode runs {name: (model, use_cache)}. The runs are
    interleaved after an untimed call of each and the best of `repeats` is kept, so load from other
    processes hits them alike."""
    calls = {name: (lambda model=model, use_cache=use_cache: decode(model, feats, None, options, use_cache=use_cache))
             for name, (model, use_cache) in runs.items()}
    timings = time_calls(calls, passes=repeats, device=feats.device)
    return {name: (t.value * 1000 / feats.size(0), t.output) for name, t in timings.items()}


def prefill_ms(model: nn.Module, feats: torch.Tensor, repeats: int) -> float:
    """Best time of the once-per-caption work as decoding does it (the recorded encoder where there is
    one): encoder, the regions' cross-attention keys/values, the cache set up."""
    with torch.no_grad():
        return time_call(lambda: start(model, feats, None, 1, 20), passes=repeats, device=feats.device).value * 1000


def models_for(k: int, base: SATModel, precision: str) -> dict[str, tuple[nn.Module, bool]]:
    """The decoders compared, as {name: (model, use_cache)}, naive first (the reference's way), then the
    fp32 ones, ours (compiled) last among them, then the reduced precision."""
    model = SATModel(dataclasses.replace(base.config, group_size=k)).to(base.positions.device)
    model.load_state_dict(base.state_dict())
    model.eval()
    if model.positions.device.type == "cuda":
        return {"naive": (model, False), "eager": (model, True),
                "graphed": (recorded(model, "fp32", compile=True), True),
                precision: (recorded(model, precision, compile=True), True)}
    return {"naive": (model, False), "eager": (model, True),
            "mkl": (recorded(model, "fp32", compile=True, kernel="torch"), True),
            "compiled": (recorded(model, "fp32", compile=True), True),
            precision: (recorded(model, precision, compile=True), True)}


def summary_ratios(rows: list[dict], big: int, precision: str, ours: str) -> dict[str, float]:
    """The speed-ups against naive, each the worst case over the K values measured (`ours`: compiled fp32),
    and those of K=2 and K=4 over K=1."""
    def ms(k, search, batch, name):
        return next(r[name] for r in rows if (r["K"], r["search"], r["batch"]) == (k, search, batch))

    ks = sorted({r["K"] for r in rows})
    checks = {}
    for search in ("greedy", "beam3"):
        checks[f"naive/ours fp32 batch 1 {search}"] = min(ms(k, search, 1, "naive") / ms(k, search, 1, ours)
                                                          for k in ks)
        checks[f"naive/ours fp32 big batch {search}"] = min(ms(k, search, big, "naive") / ms(k, search, big, ours)
                                                            for k in ks)
        checks[f"naive fp32/ours reduced (batch 1) {search}"] = min(ms(k, search, 1, "naive")
                                                                    / ms(k, search, 1, precision) for k in ks)
        for k in (2, 4):
            if k in ks and 1 in ks:
                checks[f"K={k} speed-up (batch 1) {search}"] = ms(1, search, 1, ours) / ms(k, search, 1, ours)
    return checks


def print_ceilings(model: SATModel, bandwidth: float, groups: list[int]) -> None:
    """What this machine allows at best, from counted FLOPs and bytes and measured rates: the batch-1 K
    speed-up (encoder at the peak multiply rate, every step at the weight-streaming floor) and, for large
    batches where decoding is compute-bound, naive / ours at an equal FLOP rate."""
    peak = peak_gflops()
    encoder_ms = decode_flops(model, 36, 1, 1, 0, naive=False) / peak / 1e6
    step_ms = step_weight_bytes(model) / bandwidth / 1e6
    print(f"\nceilings on this machine (peak multiply rate {peak:.0f} GFLOP/s, encoder >= {encoder_ms:.1f} ms, "
          f"step >= {step_ms:.2f} ms):")
    for k in groups:
        if k > 1:
            ceiling = (encoder_ms + 20 * step_ms) / (encoder_ms + 20 // k * step_ms)
            print(f"  K={k} speed-up at batch 1: at most {ceiling:.2f}x")
    for k in groups:
        for beams, search in ((1, "greedy"), (3, "beam3")):
            ratio = (decode_flops(model, 36, k, beams, 20, naive=True)
                     / decode_flops(model, 36, k, beams, 20, naive=False))
            print(f"  K={k} {search:<6} naive/ours FLOPs (compute-bound batches: "
                  f"the most a cache can gain): {ratio:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed run after the warm-up, batch sizes 1 and 10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-batch", type=int, default=50)
    parser.add_argument("--precision", choices=["int8", "bf16"],
                        help="the reduced-precision mode (default: int8 on the CPU, bf16 on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--groups", default="1,2,4", help="group sizes K to measure")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--fixed-costs", action="store_true", help="fixed and per-step cost at batch 1 (see above)")
    parser.add_argument("--before", type=Path, help="with --fixed-costs: also measure the code of this worktree")
    parser.add_argument("--rounds", type=int, default=3, help="with --fixed-costs: alternating rounds")
    parser.add_argument("--sizes", default="demo,paper", help="with --fixed-costs: model sizes")
    parser.add_argument("--fixed-costs-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.before and not args.fixed_costs:
        parser.error("--before needs --fixed-costs")
    if args.before and not (args.before / "src" / "satic").is_dir():  # else the worker imports this code
        parser.error(f"--before {args.before}: no src/satic there (give a git worktree of another commit)")
    if args.fixed_costs:
        compare_fixed_costs(args.before, args.repeats, args.rounds, args.groups, args.threads or 1, args.sizes,
                            args.json)
        return 0
    if args.fixed_costs_worker:
        torch.set_num_threads(args.threads or 1)
        groups = [int(x) for x in args.groups.split(",")]
        write_json(args.json, fixed_costs(args.repeats, groups, args.sizes.split(",")))
        return 0
    repeats, big = (1, 10) if args.quick else (args.repeats, args.big_batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = SATModel(SIZES["paper"]).eval()
    with torch.no_grad():
        base.generator.bias[0] = -1e4  # no early EOS: every caption is 20 words
    base.to(device)
    feats = {b: torch.randn(b, 36, 2048, generator=torch.Generator().manual_seed(b)).to(device) for b in (1, big)}
    bandwidth = read_bandwidth_gbs(device)
    p = args.precision or ("bf16" if device.type == "cuda" else "int8")
    groups = [int(x) for x in args.groups.split(",")]
    names = list(models_for(groups[0], base, p))
    ours, fp32_names = names[-2], names[1:-1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {'copy' if device.type == 'cuda' else 'read'} bandwidth "
          f"{bandwidth:.1f} GB/s\nms per image; {', '.join(repr(n) for n in fp32_names)} are our cached fp32 decoder "
          f"('{ours}': native calls, or the step recorded once per shape), '{p}' is compiled {p}; "
          "x = naive ms / our ms", flush=True)
    rows, steps_summary, step_rows = [], {}, []
    for k in groups:
        runs = models_for(k, base, p)
        for beam in (1, 3):
            options = DecodeOptions(beam_size=beam, max_length=20)
            for batch in (1, big):
                timing = timed(runs, feats[batch], options, repeats)
                seqs = {name: result.seq for name, (_, result) in timing.items()}
                row = dict(K=k, search="greedy" if beam == 1 else "beam3", batch=batch,
                           **{name: ms for name, (ms, _) in timing.items()},
                           same=all(torch.equal(seqs["naive"], seqs[n]) for n in fp32_names),
                           reduced_agree=float((seqs[p] == seqs["naive"]).float().mean()))
                rows.append(row)
                print(f"K={k} {row['search']} batch {batch}: naive {row['naive']:.2f} ms, {ours} "
                      f"{row[ours]:.2f} ms", file=sys.stderr, flush=True)  # progress; the table comes at the end
        greedy1 = rows[-4]
        for name in names[1:]:
            net = runs[name][0]
            prefill = prefill_ms(net, feats[1], repeats)
            step_ms = (greedy1[name] - prefill) / (20 // k)
            floor_ms = step_weight_bytes(getattr(net, "model", net)) / bandwidth / 1e6
            steps_summary[f"K={k} {name}"] = dict(prefill_ms=prefill, step_ms=step_ms, floor_ms=floor_ms)
            step_rows.append([str(k), name, f"{prefill:.2f}", str(20 // k), f"{step_ms:.3f}", f"{floor_ms:.3f}",
                              f"{floor_ms / step_ms:.0%}"])
    header = ["K", "search", "batch", "naive", *(c for n in names[1:] for c in (n, "x")), "same", f"{p} agree"]
    table = [[str(r["K"]), r["search"], str(r["batch"]), f"{r['naive']:.2f}",
              *(c for n in names[1:] for c in (f"{r[n]:.2f}", f"{r['naive'] / r[n]:.2f}")),
              str(r["same"]), f"{r['reduced_agree']:.3f}"] for r in rows]
    print(text_table(header, table, "rlr" + "r" * (len(header) - 3)))
    print("\nbatch 1 greedy: prefill + steps, each step against the weight-streaming floor")
    print(text_table(["K", "decoder", "prefill ms", "steps", "ms/step", "floor ms/step", "floor / step"], step_rows,
                     "rlrrrrr"))
    if device.type == "cpu":
        print_ceilings(base, bandwidth, groups)
    checks = summary_ratios(rows, big, p, ours)
    print(f"\nspeed-ups (worst case over K; 'ours' = {ours} fp32):")
    print(text_table(["ratio", "value"], [[name, f"{value:.2f}x"] for name, value in checks.items()], "lr"))
    if args.json:
        write_json(args.json, dict(rows=rows, steps=steps_summary, checks=checks, bandwidth_gbs=bandwidth,
                                   device=where, torch=torch.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
