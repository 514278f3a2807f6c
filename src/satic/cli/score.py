"""satic score: score a COCO result file against reference captions with the coco-caption metrics."""
from __future__ import annotations

import argparse
import json

from satic.cli import HelpFormatter
from satic.errors import SaticError, counted, first_few
from satic.evaluation.metrics import coco_metrics, format_table
from satic.evaluation.results import in_file_order, read_references, read_results, result_id
from satic.io import check_output_file, refuse_existing, refuse_input_as_output, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="satic score", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--results", required=True, help='result JSON: [{"image_id", "caption"}, ...]')
    parser.add_argument("--references", required=True,
                        help="Karpathy dataset JSON (dataset_coco.json) or COCO captions_*.json annotations")
    parser.add_argument("--split", default=None,
                        help="Karpathy split whose references to use (train includes restval; default: all)")
    parser.add_argument("--out", default=None, help="write metrics and per-image scores to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--spice", action="store_true", help="also run SPICE (needs Java and CoreNLP 3.6.0 jars)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.out:
        check_output_file(args.out, "--out")  # before any scoring
        refuse_input_as_output(args.out, {"--results": args.results, "--references": args.references})
        refuse_existing(args.out, args.overwrite, "--out")
    results = read_results(args.results)
    references = read_references(args.references, args.split)
    no_refs = [i for i in results if i not in references]
    if no_refs:
        shown = first_few([json.dumps(i, ensure_ascii=False) for i in no_refs], 10)
        other_type = [i for i in no_refs if (result_id(i) if isinstance(i, str) else str(i)) in references]
        if other_type:
            hint = ("; the references have them with the ids as "
                    f"{'numbers' if isinstance(other_type[0], str) else 'strings'}: write image_id as the references do")
        elif args.split:
            hint = f"; score captions of the {args.split} split's images only, or leave out --split"
        else:
            hint = "; give the references of these images, or score only the images they have"
        raise SaticError(f"{args.results}: {counted(len(no_refs), 'result image')} "
                         f"{'has' if len(no_refs) == 1 else 'have'} no references in {args.references}"
                         f"{f' (split {args.split})' if args.split else ''}: {shown}{hint}")
    if not results:
        raise SaticError(f"{args.results} holds no results")
    gts = in_file_order(references, results)  # the toolkit tokenizes the references in their file's order
    res = {i: [results[i]] for i in gts}
    overall, per_image = coco_metrics(gts, res, spice=args.spice)
    print(format_table(overall, len(results)))
    if args.out:
        write_json(args.out, {"metrics": overall, "num_images": len(results),
                              "per_image": {str(i): s for i, s in per_image.items()}},
                   replace=args.overwrite)  # another command's --out written meanwhile is kept
    return 0
