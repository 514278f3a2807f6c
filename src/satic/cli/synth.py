"""`satic synth OUT_DIR`: make the built-in captioning dataset and prepare it (labels, CIDEr-D cache)."""
from __future__ import annotations

import argparse
import time

from satic.cli import HelpFormatter, non_negative_int, positive_int
from satic.data.synth import prepare_builtin
from satic.errors import SaticError
from satic.io import user_outputs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="satic synth", description=__doc__, formatter_class=HelpFormatter,
        epilog="see satic.data.synth for what the dataset contains and why a model can learn it")
    parser.add_argument("out_dir", help="output directory (created when missing); it refuses when any file or "
                                        "folder it writes is already there, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset files and folders in out_dir; a file inside its folders that no "
                             "satic synth wrote is never deleted: it refuses instead")
    parser.add_argument("--images", type=positive_int, default=2000, help="number of images")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed: the same seed gives identical files")
    parser.add_argument("--feature-dim", type=positive_int, default=2048, help="size of each region feature vector")
    args = parser.parse_args(argv)
    if not args.out_dir:  # Path("") is the current folder
        raise SaticError("out_dir is empty; give the folder to make the dataset in (e.g. data/builtin)")
    start = time.perf_counter()
    with user_outputs(args.overwrite):  # dataset files another command wrote meanwhile are kept
        data = prepare_builtin(args.out_dir, args.images, args.seed, args.feature_dim, progress=True,
                               overwrite=args.overwrite)
    print(f"made {args.images} images in {time.perf_counter() - start:.1f} s:")
    for name, path in (("Karpathy split file", data.dataset_json), ("images", data.images_dir),
                       ("region features", data.features), ("vocabulary and image list", data.info_json),
                       ("labels", data.label_h5), ("CIDEr-D document frequencies", data.cider_df)):
        print(f"  {name:<28} {path}")
    return 0
