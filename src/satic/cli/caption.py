"""`satic caption`: caption every image of a feature store, or image files, with a checkpoint."""
from __future__ import annotations

import argparse
import sys
import unicodedata
from collections.abc import Iterable

from tqdm import tqdm

from satic.cli import (HelpFormatter, add_checkpoint_arguments, add_decoding_arguments, decoding_choices,
                       ignored_options_error, load_captioner, positive_int, seed_draws)
from satic.errors import SaticError
from satic.evaluation.results import write_caption_lists, write_results
from satic.io import check_output_file, refuse_existing, user_outputs

EPILOG = """\
Without --out the captions go to stdout batch by batch, as they are captioned, one line per image: the
image id (or the file given) and its caption, separated by a tab (a name holding a tab, newline or other
control character is quoted, as Python's repr writes it); progress and messages go to stderr. With --out
they are written to that JSON file (captioning a store, nothing goes to stdout; image files' lines are
printed as well). With --n-best or --sample-n above 1 each image has that many lines, best first (sampled
ones in the order drawn), and --out holds [{"image_id", "captions": [...]}] instead of the COCO result list."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="satic caption", description="caption a feature store or image files",
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="*", help="image files, or folders of them (not their subfolders), to caption "
                                                  "(checkpoints trained on grid features); give these or --features")
    add_checkpoint_arguments(parser)
    parser.add_argument("--features", help="feature store to caption: an _att directory, .h5/.hdf5 file or .lmdb")
    parser.add_argument("--out", help="write a COCO result list [{image_id, caption}] to this JSON file "
                                      "(default: print 'ID<tab>caption' lines to stdout)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_decoding_arguments(parser, "of the store")
    several = parser.add_argument_group("several captions per image")
    several.add_argument("--n-best", type=positive_int,
                         help="beam search: the best N finished beams of each image (at most --beam-size; "
                              "default: 1)")
    several.add_argument("--sample-n", type=positive_int,
                         help="greedy or sampling: N captions of each image (default: 1)")
    parser.add_argument("--info", help="cocotalk.json with image sizes, for checkpoints trained with use_box")
    # image files before and after options alike; after "--" (a name that starts with "-") as parse_args reads
    # them, since the intermixed parsing of Python 3.10 and 3.11 refuses what follows "--"
    args = parser.parse_args(argv) if "--" in argv else parser.parse_intermixed_args(argv)
    check_inputs(args)
    if args.out == "":  # not read as "no --out": `--out "$UNSET"` would print the captions it meant to keep
        raise SaticError("--out is empty; give a file path (without --out, caption prints to stdout)")
    if args.out:
        check_output_file(args.out, "--out", "give a file path (without --out, caption prints to stdout)")
        refuse_existing(args.out, args.overwrite, "--out")
    options = decoding_choices(args)
    captioner = load_captioner(args)
    seed_draws(args)  # after loading, which draws the initial weights it then replaces
    if args.features:
        results = caption_store(captioner, args, options)
    else:
        from satic.data.extract import image_ids, list_images
        from satic.evaluation.results import check_result_ids

        paths = list_images(args.images)  # a folder's images in name order
        ids = image_ids(paths) if args.out else []
        if args.out:  # --out keys captions by id: checked before captioning ("0" and "000" would both be 0)
            check_result_ids(ids)
        captions: list[list[str]] = []
        for batch in captioner.caption_image_batches(paths, args.batch_size, args.beam_size, progress=True,
                                                     **options):
            several = [c if isinstance(c, list) else [c] for _, c in batch]
            print_captions(zip([str(path) for path, _ in batch], several))
            if args.out:
                captions += several
        results = list(zip(ids, captions, strict=True))
    if args.out:
        with user_outputs(args.overwrite):  # another command's --out written meanwhile is kept
            if max(options.get("n_best", 1), options.get("sample_n", 1)) > 1:
                write_caption_lists(args.out, results)
            else:
                write_results(args.out, [(image_id, several[0]) for image_id, several in results])
        print(f"wrote the captions of {len(results)} images to {args.out}", file=sys.stderr)
    return 0


def check_inputs(args: argparse.Namespace) -> None:
    """A store or image files, and no store option with image files (it would be ignored)."""
    if bool(args.images) == bool(args.features):
        raise SaticError("give either --features STORE or image files to caption (not both, not neither)")
    store_only = [flag for flag, value in (("--max-images", args.max_images), ("--info", args.info)) if value]
    if args.images and store_only:
        raise ignored_options_error(store_only, "--features STORE", "with image files every file given is captioned")


def caption_store(captioner, args: argparse.Namespace, options: dict) -> list[tuple[str, list[str]]]:
    """(image id, its captions) of the store's images, in the store's order, with --out; without, each batch's
    captions are printed as it is captioned and none are kept."""
    from satic.data.stores import open_store

    sizes = None
    if args.info:
        from satic.data.labels import read_cocotalk

        _, images = read_cocotalk(args.info)
        sizes = {str(img["id"]): (img["width"], img["height"]) for img in images if "width" in img}
    with open_store(args.features) as store:
        ids = store.nonempty_ids()[: args.max_images]
        if args.out:
            from satic.evaluation.results import check_result_ids

            check_result_ids(ids)  # before captioning: "1" and "01" would both be written as 1
        results: dict = {}
        for rows in captioner.caption_store_batches(store, ids, args.batch_size, args.beam_size, sizes,
                                                    progress=True, **options):
            batch: dict = {}
            for row in rows:  # each image's captions follow one another, best first
                batch.setdefault(row["image_id"], []).append(row["caption"])
            if args.out:
                results.update(batch)
            else:
                print_captions(batch.items())
    return list(results.items())


def print_captions(captions: Iterable[tuple[str, list[str]]]) -> None:
    """A batch's 'name<tab>caption' lines, flushed at once so that a reader of the pipe has each batch as soon as it
    is captioned; the progress bar on stderr is cleared and drawn again below them."""
    lines = [f"{line_field(name)}\t{caption}" for name, several in captions for caption in several]
    if lines:
        tqdm.write("\n".join(lines), file=sys.stdout)
        sys.stdout.flush()


def line_field(name: str) -> str:
    """A file name or image id as the first field of a printed line: as it is, or repr-quoted when it holds a
    control character (a tab or newline would split the line; names with spaces or accents are kept as they are)."""
    return repr(name) if any(unicodedata.category(ch) == "Cc" for ch in name) else name
