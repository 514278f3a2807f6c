"""`satic caption`: caption every image of a feature store, or image files, with a checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from satic.cli import (HelpFormatter, add_checkpoint_arguments, add_decoding_arguments, decoding_choices,
                       ignored_options_error, load_captioner, positive_int, seed_draws, writing_stdout)
from satic.errors import SaticError, counted
from satic.evaluation.partial import PartialFile, PartialInUse, partial_path, set_device_random_state
from satic.evaluation.results import write_caption_lists, write_results
from satic.io import (UnusablePartial, check_output_file, checkpoint_digest, make_output_dir, refuse_existing,
                      user_outputs, version_stamp)

EPILOG = """\
Without --out the captions go to stdout batch by batch, as they are captioned, one line per image: the
image id (or the file given) and its caption, separated by a tab (a name holding a tab, newline or other
control character is quoted, as Python's repr writes it); progress and messages go to stderr. With --out
they are written to that JSON file (captioning a store, nothing goes to stdout; image files' lines are
printed as well). With --n-best or --sample-n above 1 each image has that many lines, best first (sampled
ones in the order drawn), and --out holds [{"image_id", "captions": [...]}] instead of the COCO result list.
--scores adds each caption's score: a third field on its line, "score" in --out ("scores": [...] beside
"captions"; null where the model's numbers overflowed).
A run with --out that is stopped, killed or fails part way keeps the captions of its finished batches in
OUT.partial.jsonl; the same command goes on from them (--overwrite starts afresh)."""


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
    parser.add_argument("--scores", action="store_true",
                        help="give each caption's score: the summed log-prob of its words, or with --beam-size "
                             "above 1 the beam's ranking score (after --length-penalty)")
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
        caption_store(captioner, args, options)
    else:
        caption_files(captioner, args, options)
    return 0


def check_inputs(args: argparse.Namespace) -> None:
    """A store or image files, and no store option with image files (it would be ignored)."""
    if bool(args.images) == bool(args.features):
        raise SaticError("give either --features STORE or image files to caption (not both, not neither)")
    store_only = [flag for flag, value in (("--max-images", args.max_images), ("--info", args.info)) if value]
    if args.images and store_only:
        raise ignored_options_error(store_only, "--features STORE", "with image files every file given is captioned")


def caption_store(captioner, args: argparse.Namespace, options: dict) -> None:
    """The store's images, in the store's order: their captions to --out, or each batch's printed as it is
    captioned."""
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
        inputs = {"features": str(Path(args.features).resolve()), "features_version": version_stamp(store.path),
                  "info": None if args.info is None else str(Path(args.info).resolve())} if args.out else {}
        with Captions(captioner, args, options, ids, inputs) as kept:
            batches = captioner.caption_store_batches(store, ids[kept.done:], args.batch_size, args.beam_size, sizes,
                                                      progress=True, return_scores=args.scores, **options)
            for rows in kept.go_on(batches):
                batch: dict = {}
                for row in rows:  # each image's captions follow one another, best first
                    caption = {"caption": row["caption"], "score": row["score"]} if args.scores else row["caption"]
                    batch.setdefault(row["image_id"], []).append(caption)
                kept.add(list(batch.items()))
                if not args.out:
                    print_captions(batch.items())
            kept.publish()


def caption_files(captioner, args: argparse.Namespace, options: dict) -> None:
    """The image files, in the order listed: their lines printed as each batch is captioned, and their captions
    to --out."""
    from satic.data.extract import image_ids, list_images
    from satic.evaluation.results import check_result_ids

    paths = list_images(args.images)  # a folder's images in name order
    ids = image_ids(paths) if args.out else [str(path) for path in paths]
    if args.out:  # --out keys captions by id: checked before captioning ("0" and "000" would both be 0)
        check_result_ids(ids)
    inputs = {"files": hashlib.sha256(b"\0".join(os.fsencode(path.resolve()) for path in paths)).hexdigest()
              } if args.out else {}  # the paths' bytes: a folder's name need not be UTF-8
    with Captions(captioner, args, options, ids, inputs) as kept:
        kept.refuse_changed(paths)
        batches = captioner.caption_image_batches(paths[kept.done:], args.batch_size, args.beam_size,
                                                  return_scores=args.scores, progress=True, **options)
        for batch in kept.go_on(batches):
            several = [c if isinstance(c, list) else [c] for _, c in batch]
            kept.add(list(zip(ids[kept.done:], several)), [version_stamp(path) for path, _ in batch])
            print_captions(zip([str(path) for path, _ in batch], several))
        kept.publish()


class Captions:
    """The captions of a run with --out, kept in order: those an earlier run of the same command stopped with
    (OUT.partial.jsonl), then each new batch, saved to that file as it comes, so that a run stopped, killed or
    failed part way can go on. Without --out nothing is kept."""

    def __init__(self, captioner, args: argparse.Namespace, options: dict, ids: list[str], inputs: dict):
        self.ids, self.captions, self.writer, self.done, self.start = ids, [], None, 0, 0
        self.args, self.options, self.rng, self.device_rng = args, options, None, None
        self.device = captioner.device
        self.stamps: list[str | None] = []  # the version stamps of the image files kept captions are of
        decoding = captioner.options(args.beam_size, **options)
        self.draws = decoding.sample_method == "sample"
        if not args.out:
            return
        self.partial = check_output_file(partial_path(args.out), "the file of the captions decoded so far",
                                         "move it away")
        make_output_dir(self.partial.parent, "folder")  # --out's, made as for any output
        settings = {"checkpoints": [checkpoint_digest(Path(c)) for c in args.checkpoint], "weights": args.weights,
                    "precision": args.precision, "device": str(captioner.device), "batch_size": args.batch_size,
                    "seed": args.seed, "decoding": dataclasses.asdict(decoding), **inputs}
        if args.scores:  # (a key only then: files kept without scores by earlier versions go on as they were)
            settings["scores"] = True
        try:
            self.writer = PartialFile(self.partial)
        except PartialInUse:
            print(f"note: another command is captioning to {args.out} and keeps its progress in {self.partial}; "
                  "this one keeps none", file=sys.stderr)
            return
        try:
            kept = None if args.overwrite else self.writer.resume(settings, ids)
        except BaseException:
            self.writer.close()
            raise
        if kept is None:
            try:
                self.writer.start(settings)
            except UnusablePartial:  # a file satic did not write: left as it is
                self.writer.close()
                raise
            except BaseException:  # emptied, its header not written (a full disk): nothing to go on from
                self.writer.remove()
                raise
        else:
            self.captions, self.done, self.rng, self.device_rng = (kept.captions, len(kept.captions), kept.rng,
                                                                   kept.device_rng)
            self.stamps = kept.stamps
            print(f"going on from {self.partial}: {self.done} of {len(ids)} images captioned", file=sys.stderr)
        self.start = self.done

    def refuse_changed(self, files: list[Path]) -> None:
        """Kept captions of image files rewritten since the stopped run captioned them are not theirs: refused,
        naming the first such file (and not offered to the same command again)."""
        changed = next((path for path, stamp in zip(files, self.stamps) if stamp != version_stamp(path)), None)
        if changed is not None:
            self.start = None
            raise SaticError(f"{changed} changed after the interrupted run captioned it, so the captions kept in "
                             f"{self.partial} are not all of these files; give --overwrite to caption every image "
                             "afresh")

    def go_on(self, batches: Iterator) -> Iterator:
        """The batches still to caption, drawing from the random state the kept ones left (set once everything
        before the first draw, such as building the image backbone, has drawn what it draws)."""
        if self.rng is not None:
            torch.set_rng_state(self.rng)
        if self.device_rng is not None:
            set_device_random_state(self.device, self.device_rng)
        return batches

    def add(self, batch: list[tuple[str, list[str | dict]]], stamps: list[str] | None = None) -> None:
        if self.writer is not None:
            self.writer.add(batch, self.draws, self.device, stamps)
        if self.args.out:
            self.captions += batch
        self.done += len(batch)

    def publish(self) -> None:
        """Write --out (refused if another command wrote it meanwhile) and remove the partial file."""
        if not self.args.out:
            return
        self.start = None  # a failure from here on is not one the same command can go on from
        with user_outputs(self.args.overwrite):  # another command's --out written meanwhile is kept
            if max(self.options.get("n_best", 1), self.options.get("sample_n", 1)) > 1:
                write_caption_lists(self.args.out, self.captions)
            else:
                write_results(self.args.out, [(image_id, several[0]) for image_id, several in self.captions])
        if self.writer is not None:  # still held: no other command has taken it up meanwhile
            self.partial.unlink(missing_ok=True)
        print(f"wrote the captions of {counted(len(self.captions), 'image')} to {self.args.out}", file=sys.stderr)

    def __enter__(self) -> "Captions":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.writer is None:
            return
        if error is not None and self.done == 0:  # nothing to go on from: no file to stand in a later run's way
            self.writer.remove()
            return
        self.writer.close()
        if error is not None and self.start is not None:
            print(f"kept the captions of {self.done} of {len(self.ids)} images in {self.partial}; the same command "
                  "goes on from them", file=sys.stderr)


def print_captions(captions: Iterable[tuple[str, list[str | dict]]]) -> None:
    """A batch's 'name<tab>caption' lines ('name<tab>caption<tab>score' for captions given with their scores), flushed
    at once so that a reader of the pipe has each batch as soon as it is captioned; the progress bar on stderr is
    cleared and drawn again below them."""
    lines = [f"{line_field(name)}\t{caption_field(caption)}" for name, several in captions for caption in several]
    if lines:
        with writing_stdout():
            tqdm.write("\n".join(lines), file=sys.stdout)


def caption_field(caption: str | dict) -> str:
    """A caption as its line shows it: the text, or the text, a tab and the score to 4 decimals."""
    return f"{caption['caption']}\t{caption['score']:.4f}" if isinstance(caption, dict) else caption


def line_field(name: str) -> str:
    """A file name or image id as the first field of a printed line: as it is, or repr-quoted when it holds a
    control character (a tab or newline would split the line; names with spaces or accents are kept as they are)."""
    return repr(name) if any(unicodedata.category(ch) == "Cc" for ch in name) else name
