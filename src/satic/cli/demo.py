"""`satic demo [--out DIR] [--fast]`: the whole SATIC recipe on the built-in dataset (`make demo`)."""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="satic demo", description=__doc__,
        epilog="Makes the data, trains the K=1 teacher (XE then SCST), makes seq-KD labels with it, trains "
               "SAT K=2 and K=4 from the teacher's weights (XE on seq-KD labels, then SCST), scores every model "
               "on the test split and times it at batch 1. Writes DIR/report.json and DIR/speed_quality.png. "
               "Stages run from configs/demo/*.yaml; a stage can be re-run alone with `satic train`.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--fast", action="store_true", help="a much smaller run that checks the pipeline (< 1 min)")
    args = parser.parse_args(argv)
    from satic.training.demo import run_demo

    run_demo(args.out, fast=args.fast)
    return 0
