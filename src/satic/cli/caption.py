"""`satic caption`: caption every image of a feature store, or image files, with a checkpoint."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from satic.errors import SaticError
from satic.evaluation.results import write_results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="satic caption", description="caption a feature store or image files")
    parser.add_argument("images", nargs="*", help="image files to caption (checkpoints trained on grid features)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors + config.json)")
    parser.add_argument("--features", help="feature store to caption: an _att directory, .h5/.hdf5 file or .lmdb")
    parser.add_argument("--out", help="write a COCO result list [{image_id, caption}] to this JSON file")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-images", type=int, help="caption only the first M images of the store")
    parser.add_argument("--max-length", type=int, help="longest caption in words (default: the checkpoint's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--info", help="cocotalk.json with image sizes, for checkpoints trained with use_box")
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.features):
        raise SaticError("give either --features STORE or image files to caption (not both, not neither)")
    from satic.captioner import Captioner

    captioner = Captioner.load(args.checkpoint, args.precision, args.device)
    options = {"max_length": args.max_length} if args.max_length else {}
    if args.features:
        results = caption_store(captioner, args, options)
    else:
        from satic.data.extract import image_ids

        ids = image_ids([Path(p) for p in args.images])
        captions = captioner.caption_images(args.images, args.batch_size, args.beam_size, **options)
        for path, caption in zip(args.images, captions):
            print(f"{path}\t{caption}")
        results = list(zip(ids, captions))
    if args.out:
        write_results(args.out, results)
        print(f"wrote {len(results)} captions to {args.out}", file=sys.stderr)
    return 0


def caption_store(captioner, args: argparse.Namespace, options: dict) -> list[tuple[str, str]]:
    from satic.data.stores import open_store

    sizes = None
    if args.info:
        from satic.data.labels import read_cocotalk

        _, images = read_cocotalk(args.info)
        sizes = {str(img["id"]): (img["width"], img["height"]) for img in images if "width" in img}
    with open_store(args.features) as store:
        ids = store.ids()[: args.max_images] if args.max_images else store.ids()
        results = captioner.caption_store(store, ids, args.batch_size, args.beam_size, sizes, progress=True, **options)
    results = [(r["image_id"], r["caption"]) for r in results]
    if not args.out:
        for image_id, caption in results:
            print(f"{image_id}\t{caption}")
    return results
