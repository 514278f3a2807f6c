"""Caption quality of the reduced-precision modes (bf16, int8) against fp32 on the built-in dataset.

Takes the checkpoints a `satic demo` run trained (default runs/demo), captions its validation and
test splits (300 images: with 150, one changed caption moves CIDEr by ~0.5%) with each model in fp32,
bf16 and int8 (greedy and beam 3, batch 50), scores every result set with the toolkit's metrics,
and prints CIDEr, the change against fp32, the share of captions identical to fp32's, and ms per
image at batch 1 (greedy, one thread), then each reduced mode's largest CIDEr change.

    python benchmarks/precision_quality.py [--run runs/demo] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from satic.captioner import Captioner
from satic.decoding.precision import PRECISIONS
from satic.errors import SaticError
from satic.evaluation.evaluate import as_captioner, caption_split, open_data
from satic.evaluation.metrics import coco_metrics_of_sets
from satic.evaluation.report import text_table
from satic.io import write_json
from satic.training.demo import final_latency, reference_captions

MODELS = ("teacher_scst", "sat_k2_scst", "sat_k4_scst")
SEARCHES = {"greedy": 1, "beam3": 3}


def split_results(captioner: Captioner, data_dir: Path, splits: list[str]) -> dict[str, dict]:
    """{search: {image id: caption}} for the images of `splits`, batch 50."""
    data = open_data(captioner, data_dir)
    results = {}
    for search, beam in SEARCHES.items():
        results[search] = {}
        for split in splits:
            ids, captions = caption_split(captioner, data, split, captioner.options(beam), 50)
            results[search].update(zip(ids, captions))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished `satic demo` output folder")
    parser.add_argument("--splits", default="val,test", help="splits to caption and score, comma-separated")
    parser.add_argument("--latency-images", type=int, default=50, help="test images timed at batch 1")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    data_dir = args.run / "data"
    missing = [m for m in MODELS if not (args.run / m / "best").is_dir()]
    if missing or not data_dir.is_dir():
        raise SaticError(f"{args.run} lacks {missing or ['data']}: run `satic demo --out {args.run}` first")
    torch.set_num_threads(1)
    results, captioners = {}, {}
    for model in MODELS:
        for precision in PRECISIONS:
            captioners[f"{model}|{precision}"] = captioner = as_captioner(args.run / model / "best", precision)
            for search, captions in split_results(captioner, data_dir, args.splits.split(",")).items():
                results[f"{model}|{precision}|{search}"] = captions
            print(f"{model} {precision}: captioned", flush=True)
    data = open_data(next(iter(captioners.values())), data_dir)  # every model reads the same features
    measured, _ = final_latency(captioners, data, args.latency_images, 1, 3)
    ms = {key: times["greedy_bs1"] for key, times in measured.items()}
    ids = list(next(iter(results.values())))
    sets = coco_metrics_of_sets(reference_captions(data_dir, ids),
                                {key: {i: [c] for i, c in res.items()} for key, res in results.items()})
    scores = {key: overall for key, (overall, _) in sets.items()}
    rows, table = [], []
    for model in MODELS:
        for search in SEARCHES:
            fp32 = f"{model}|fp32|{search}"
            for precision in PRECISIONS:
                key = f"{model}|{precision}|{search}"
                cider = scores[key]["CIDEr"]
                change = cider / scores[fp32]["CIDEr"] - 1.0
                same = sum(results[key][i] == results[fp32][i] for i in ids) / len(ids)
                rows.append(dict(model=model, precision=precision, search=search, CIDEr=cider, change=change,
                                 same_captions=same, ms_greedy_bs1=ms[f"{model}|{precision}"], metrics=scores[key]))
                table.append([model, precision, search, f"{cider * 100:.1f}", f"{change:+.2%}", f"{same:.1%}",
                              f"{ms[f'{model}|{precision}']:.1f}"])
    print()
    print(text_table(["model", "precision", "search", "CIDEr", "vs fp32", "same", "ms bs1"], table, "lll" + "r" * 4))
    print("\nlargest CIDEr change against fp32 (over models and searches)")
    for precision in PRECISIONS[1:]:
        worst = max(abs(r["change"]) for r in rows if r["precision"] == precision)
        print(f"  {precision}: {worst:.2%}")
    if args.json:
        write_json(args.json, dict(rows=rows, images=len(ids), splits=args.splits, torch=torch.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
