"""`satic prepro`: Karpathy split JSON -> cocotalk.json, cocotalk_label.h5, the CIDEr-D cache and the val/test
references (references.json)."""
from __future__ import annotations

import argparse

from satic.cli import HelpFormatter, positive_int
from satic.data.labels import prepare_labels
from satic.io import user_outputs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="satic prepro", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--karpathy", required=True, help="Karpathy split file, e.g. dataset_coco.json")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    parser.add_argument("--word-count-threshold", type=int, default=5,
                        help="keep words seen more than this many times; rarer ones become UNK")
    parser.add_argument("--max-length", type=positive_int, default=16, help="cut captions at this many words")
    parser.add_argument("--images-root", help="also record each image's width and height (needed for use_box)")
    parser.add_argument("--cider-df-from", metavar="PICKLE",
                        help="convert the reference's coco-train-idxs.p (read safely) instead of counting n-grams")
    args = parser.parse_args(argv)
    with user_outputs(args.overwrite):  # files another command wrote into --out meanwhile are kept
        paths = prepare_labels(args.karpathy, args.out, args.word_count_threshold, args.max_length,
                               args.images_root, args.cider_df_from, args.overwrite)
    print(paths.vocabulary)
    for path in (paths.info_json, paths.label_h5, paths.cider_df, paths.references):
        if path is not None:
            print(f"wrote {path}")
    return 0
