"""`satic features extract`: image files -> grid region features in any feature store."""
from __future__ import annotations

import argparse

from satic.cli import HelpFormatter, positive_int, whole_number
from satic.config import from_dict
from satic.data.extract import (BACKBONES, MAX_SIZE, MIN_SIZE, SIZE_RULE, ExtractorSettings, extract_to_store,
                                list_images)
from satic.data.stores import KINDS
from satic.io import user_outputs


def image_size(text: str) -> int:
    """argparse type for --size, in the range ExtractorSettings takes."""
    value = whole_number(text)
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be {SIZE_RULE}, got {value}")
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="satic features extract",
                                     description="images -> grid region features (one region per grid cell)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files and/or directories of images (the images directly inside, not in subfolders)")
    parser.add_argument("--out", required=True,
                        help="new store: a path ending in _att (npz), .h5/.hdf5 or _att.lmdb")
    parser.add_argument("--backbone", default=ExtractorSettings.backbone, choices=sorted(BACKBONES),
                        help="feature network")
    parser.add_argument("--size", type=image_size, default=ExtractorSettings.size,
                        help=f"images are resized to SIZE x SIZE ({MIN_SIZE}..{MAX_SIZE}; one region per 32 x 32 "
                             "pixels)")
    parser.add_argument("--weights", help="backbone weights file (the default backbone has its own)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images run through the backbone at once")
    parser.add_argument("--kind", choices=KINDS, help="store kind (default: from --out's suffix)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images and list them, instead of stopping with nothing written")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    args = parser.parse_args(argv)
    settings = from_dict(ExtractorSettings, {"backbone": args.backbone, "size": args.size, "weights": args.weights},
                         "extract options")
    with user_outputs(args.overwrite):  # the store's sidecar too: another command's is kept
        report = extract_to_store(list_images(args.images), args.out, settings, args.batch_size, args.skip_bad,
                                  args.kind, args.overwrite, progress=True, device=args.device)
    for path, reason in report.bad:
        print(f"skipped {path}: {reason}")
    print(f"wrote {report.count} images x {report.regions} regions x {report.feature_dim} to {report.store}"
          + (f" ({len(report.bad)} skipped)" if report.bad else ""))
    return 0
