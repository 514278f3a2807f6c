"""Self-critical variants on the demo's recipe: test CIDEr of the teacher, K=2 and K=4 after SCST with
the defaults (the reference's semantics) and with each opt-in variant, from the same XE checkpoints.

The shared stages run once, as `satic demo` runs them (configs/demo): teacher XE, teacher SCST with the
defaults (its beam-5 captions are the students' seq-KD labels), K=2 XE and K=4 XE; or they come from
an existing demo run (--from-demo runs/demo). Each variant then trains the three SCST stages from those
XE checkpoints, and every stage's best/ is scored on the test split (greedy, `satic eval`). The table
shows test CIDEr, its ratio to the same variant's teacher, the change over the XE start, and the SCST
stage's wall time.

    python benchmarks/scst_variants.py [--out runs/scst-variants] [--from-demo DIR] [--fast]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from satic.cli import main as satic
from satic.config import configs_dir, read_yaml
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_call
from satic.io import read_json

VARIANTS = {
    "reference": [],  # the defaults: scst.semantics=reference, scst.logprobs=sampling, scst.prefix_dropout=fresh
    "output": ["scst.semantics=output"],
    "rescore": ["scst.logprobs=rescore"],
    # the demo trains without dropout, where the two prefix_dropout settings are one function: these two
    # train SCST with the decoder's dropout at the paper's 0.1
    "dropout": ["model.dropout=0.1"],
    "dropout-kept": ["model.dropout=0.1", "scst.prefix_dropout=kept"],
}
MODELS = (("teacher", "teacher_xe", "teacher_scst"), ("K=2", "sat_k2_xe", "sat_k2_scst"),
          ("K=4", "sat_k4_xe", "sat_k4_scst"))
SEQKD_LABELS = "seqkd_labels.h5"


def run(argv: list[str]) -> None:
    code = satic(argv)
    if code != 0:
        raise SystemExit(f"satic {' '.join(argv)} exited with {code}")


def train_stage(config: str, out_dir: Path, data: Path, extra: list[str]) -> float:
    """Wall seconds of one `satic train` stage."""
    argv = ["train", str(configs_dir() / "demo" / f"{config}.yaml"), f"out_dir={out_dir}", f"data.dir={data}",
            "progress=false", "overwrite=true", *extra]  # this script owns its out folder
    return time_call(lambda: run(argv), passes=1, warm_up=0).value


def test_cider(checkpoint: Path, data: Path, out: Path) -> float:
    run(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "test", "--out", str(out),
         "--overwrite"])  # a rerun replaces this script's own evaluations
    return read_json(out / "metrics.json")["metrics"]["CIDEr"]


def shared_stages(out: Path, fast: list[str]) -> Path:
    """Teacher XE + SCST, seq-KD labels, student XE: the checkpoints every variant starts from."""
    data = out / "data"
    if not (out / "teacher_xe" / "best").is_dir():
        train_stage("teacher_xe", out / "teacher_xe", data, fast)
    if not (out / "teacher_scst" / "best").is_dir():
        train_stage("teacher_scst", out / "teacher_scst", data, [f"init_from={out / 'teacher_xe' / 'best'}", *fast])
    labels = data / SEQKD_LABELS
    if not labels.is_file():
        run(["distill", "--teacher", str(out / "teacher_scst" / "best"), "--data", str(data), "--out", str(labels),
             "--beam-size", "5"])
    for k in (2, 4):
        if not (out / f"sat_k{k}_xe" / "best").is_dir():
            train_stage(f"sat_k{k}_xe", out / f"sat_k{k}_xe", data,
                        [f"init_from={out / 'teacher_scst' / 'best'}", f"data.labels={labels}", *fast])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/scst-variants"))
    parser.add_argument("--from-demo", type=Path, help="a `satic demo` run whose XE checkpoints to start from")
    parser.add_argument("--fast", action="store_true", help="the demo's --fast sizes: a smoke test of this script")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    fast = [f"{k}={v}" for k, v in read_yaml(configs_dir() / "demo" / "demo.yaml")["fast"].items()] if args.fast else []
    source = args.from_demo or args.out
    data = source / "data" if args.from_demo else shared_stages(args.out, fast)
    rows = []
    xe = {name: test_cider(source / xe_stage / "best", data, args.out / "eval" / xe_stage)
          for name, xe_stage, _ in MODELS}
    for variant in args.variants:
        for name, xe_stage, scst_stage in MODELS:
            stage_out = args.out / variant / scst_stage
            seconds = train_stage(scst_stage, stage_out, data,
                                  [f"init_from={source / xe_stage / 'best'}", *fast, *VARIANTS[variant]])
            cider = test_cider(stage_out / "best", data, args.out / "eval" / variant / scst_stage)
            rows.append((variant, name, cider, xe[name], seconds))
    table = []
    for variant, name, cider, start, seconds in rows:
        teacher = next(c for v, n, c, _, _ in rows if v == variant and n == "teacher")
        table.append([variant, name, f"{cider:.4f}", f"{cider / teacher:.1%}", f"{start:.4f}", f"{cider - start:+.4f}",
                      f"{seconds:.0f}"])
    print()
    print(text_table(["variant", "model", "test CIDEr", "of teacher", "XE start", "SCST gain", "SCST s"], table,
                     "ll" + "r" * 5))


if __name__ == "__main__":
    main()
