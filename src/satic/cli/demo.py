"""`satic demo [--out DIR] [--fast] [--images] [--jobs N] [--resume]`: the whole SATIC recipe on the built-in
dataset (`make demo`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from satic.cli import positive_int
from satic.errors import SaticError
from satic.io import is_unicode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="satic demo", description=__doc__,
        epilog="Makes the data, trains the K=1 teacher (XE then SCST), makes seq-KD labels with it, trains "
               "SAT K=2 and K=4 from the teacher's weights (XE on seq-KD labels, then SCST), scores every model "
               "on the test split (greedy, and the final ones by beam 3 too) and times the final ones at batch 1. "
               "Writes DIR/report.json, DIR/speed_quality.png and DIR/gallery.html. Stages run from "
               "configs/demo/*.yaml; a stage can be re-run alone with `satic train`. With --images the models "
               "train on EfficientNet-Lite0 grid features of the rendered PNGs (DIR/data/grid_att) and finally caption "
               "new rendered scenes and scikit-image photos from their files (DIR/new_images).",
    )
    parser.add_argument("--out", help="output folder (default runs/demo, with --images runs/demo-images)")
    parser.add_argument("--fast", action="store_true", help="a much smaller run that checks the pipeline (< 1 min)")
    parser.add_argument("--images", action="store_true",
                        help="image mode: train on features the real backbone extracts from the rendered images")
    parser.add_argument("--jobs", type=positive_int,
                        help="student chains (K=2, K=4) trained at once, one process each; every stage runs on one "
                             "thread, so the results do not depend on it (default: one per CPU, at most 2; 1 with "
                             "--fast, whose stages are shorter than a process's start-up)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted demo in --out (started with the same --fast / --images): "
                             "finished stages are kept and a stopped one continues from its last checkpoint, so the "
                             "results are those of an uninterrupted run")
    parser.add_argument("--stages", help=argparse.SUPPRESS)  # a --jobs process: train only these stages
    parser.add_argument("--timings", type=Path, help=argparse.SUPPRESS)  # ... and write their seconds here
    args = parser.parse_args(argv)
    from satic.training.demo import run_demo, run_stages

    if args.out == "":  # not the default folder, nor the current one
        raise SaticError("--out is empty; give the demo's folder, or leave --out out for runs/demo")
    out = Path(args.out or ("runs/demo-images" if args.images else "runs/demo"))
    if not is_unicode(str(out)):  # a name in another encoding, or a non-ASCII one under an ASCII locale
        raise SaticError(f"--out {out} is not UTF-8 text as read here, which the stages' configs (YAML) cannot hold; "
                         "give a folder with a UTF-8 name (under a locale that is not UTF-8, run with PYTHONUTF8=1)")
    if args.stages:
        run_stages(out, args.stages.split(","), args.fast, args.images, args.timings, args.resume)
    else:
        run_demo(out, fast=args.fast, images=args.images, jobs=args.jobs, resume=args.resume)
    return 0
