"""`satic features SUBCOMMAND`: convert, check, import or extract region features.

The table maps each name to "module" (its `main(argv) -> int`) or "module:function", imported
lazily, so `extract` (images -> grid region features) lives in its own module and later
subcommands are one line here.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from satic.cli import HelpFormatter, positive_int

SUBCOMMANDS = {
    "convert": ("satic.cli.features:convert", "copy a feature store into another kind (npz, hdf5, lmdb)"),
    "check": ("satic.cli.features:check", "validate every entry of a feature store"),
    "import-tsv": ("satic.cli.features:import_tsv", "bottom-up-attention TSV files -> a feature store"),
    "extract": ("satic.cli.features_extract", "images -> grid region features"),
}


def usage() -> str:
    lines = ["usage: satic features SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"satic features: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    return int(entry(rest) or 0)


def convert(argv: list[str]) -> int:
    from satic.data.extract import create_grid_store, read_store_extractor, sidecar_path
    from satic.data.stores import KINDS, copy_store, create_store, kind_for_path, open_store
    from satic.io import remove_path

    parser = argparse.ArgumentParser(prog="satic features convert", description=SUBCOMMANDS["convert"][1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("src", help="source store: an _att directory, .h5/.hdf5 file or .lmdb")
    parser.add_argument("dst", help="new store (npz: a path ending in _att; lmdb: ending in _att.lmdb)")
    parser.add_argument("--kind", choices=KINDS, help="kind of the new store (default: from DST's suffix)")
    parser.add_argument("--dtype", choices=("float16", "float32", "float64"),
                        help="number type of the new store's regions (default: the source's); float16 takes half "
                             "the disk of float32, and training and captioning read it as float32")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    src = open_store(args.src)
    src.nonempty_ids()
    kind = args.kind or kind_for_path(args.dst)
    # grid features keep the record of the extractor that made them (SRC.extractor.json), which training and
    # captioning read: without it, a model trained on the copy could not caption image files
    settings = read_store_extractor(args.src)
    with src, (create_store(args.dst, kind, overwrite=args.overwrite) if settings is None else
               create_grid_store(args.dst, settings, kind, overwrite=args.overwrite)) as writer:
        count = copy_store(src, writer, progress=True, dtype=args.dtype)
    if settings is None and args.overwrite:
        remove_path(sidecar_path(args.dst))  # the record of a replaced grid store would describe other features
    print(f"wrote {count} images to {args.dst} ({kind})")
    return 0


def check(argv: list[str]) -> int:
    from satic.data.stores import MAX_REGIONS, check_store, open_store

    parser = argparse.ArgumentParser(prog="satic features check", description=SUBCOMMANDS["check"][1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("path", help="feature store: an _att directory, .h5/.hdf5 file or .lmdb")
    parser.add_argument("--max-regions", type=positive_int, default=MAX_REGIONS,
                        help="most regions an image may have (bottom-up features have 10 to 100, the reference's "
                             "14 x 14 ResNet grids 196)")
    args = parser.parse_args(argv)
    with open_store(args.path) as store:
        total = len(store.nonempty_ids())
        bad = list(check_store(store, args.max_regions, progress=True))
        unread = store.unread_ids()  # files of another form in the store's folder: no image reads them
        unread_note = store.missing_note(unread)
    for image_id, problems in bad:
        print(f"bad {image_id}: {'; '.join(problems)}")
    if unread:
        print(f"not read: {len(unread)} image{'s' if len(unread) > 1 else ''} (e.g. {unread[:3]}){unread_note}")
    print(f"{total - len(bad)} of {total} images ok, {len(bad)} bad in {args.path}"
          + (f", {len(unread)} not read" if unread else ""))
    return 1 if bad or unread else 0


def import_tsv(argv: list[str]) -> int:
    from satic.data.stores import KINDS, create_store, kind_for_path
    from satic.data.tsv import import_tsv as run_import

    parser = argparse.ArgumentParser(prog="satic features import-tsv", description=SUBCOMMANDS["import-tsv"][1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("tsv", nargs="+", help="the detector's .tsv files")
    parser.add_argument("--out", required=True, help="new store (npz: a path ending in _att; lmdb: _att.lmdb)")
    parser.add_argument("--kind", choices=KINDS, help="kind of the new store (default: from --out's suffix)")
    parser.add_argument("--dtype", choices=("float16", "float32"),
                        help="number type of the stored regions (default: the TSV's float32); float16 takes half "
                             "the disk, and training and captioning read it as float32")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    kind = args.kind or kind_for_path(args.out)
    with create_store(args.out, kind, overwrite=args.overwrite) as writer:
        count = run_import(args.tsv, writer, progress=True, dtype=args.dtype)
    print(f"imported {count} images into {args.out} ({kind})")
    return 0

