"""`satic eval`: caption a split, report the COCO metrics and ms per image; or write COCO server files."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from satic.cli import (HelpFormatter, add_checkpoint_arguments, add_decoding_arguments, decoding_choices,
                       ignored_options_error, load_captioner, seed_draws)
from satic.errors import SaticError
from satic.io import check_output_dir, left_unfinished, refuse_existing_in, refuse_input_as_output, user_outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="satic eval", description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--data", help="prepared dataset directory (cocotalk.json, cocotalk_label.h5)")
    parser.add_argument("--split", default="test", help="train, val or test")
    parser.add_argument("--features", help="feature store (default: the built-in dataset's, inside --data)")
    parser.add_argument("--references", help="Karpathy dataset JSON or COCO captions file (default: "
                                             "--data/references.json, written by satic prepro, or --data/dataset.json)")
    add_decoding_arguments(parser, "of the split", beam_size_help="beam width; 1 is greedy decoding (default: 1, "
                           "and 3 with --coco-server, as the reference's eval.py and eval_cocotest.py)")
    parser.add_argument("--spice", action="store_true", help="also run SPICE (needs Java and the CoreNLP jars)")
    parser.add_argument("--out", help="directory for predictions.json, scores.json, metrics.json (and "
                                      "predictions.html when the images exist)")
    parser.add_argument("--image-root", help="folder under which each image's file_path (cocotalk.json) is, for "
                                             "predictions.html (default: --data), as the reference's --image_root")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace those files (or the server file) if --out already holds them")
    server = parser.add_argument_group("COCO evaluation server (a feature store without references)")
    server.add_argument("--coco-server", choices=("test2014", "val2014"),
                        help="write captions_<split>_<alg>_results.json for --features into --out")
    server.add_argument("--alg", help="algorithm name in the server file name (default: none, "
                                      "captions_<split>__results.json: the names the CodaLab server opens)")
    server.add_argument("--image-list", help="the split's image ids: image-info JSON, JSON list or one id per line")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.out:
        check_output_dir(args.out, "--out")  # before any captioning
    check_mode_options(args)
    if args.coco_server and args.alg is None:
        from satic.evaluation.results import SERVER_ALG

        args.alg = SERVER_ALG
    if args.out:
        for name in output_names(args):
            refuse_input_as_output(f"{args.out}/{name}", {"--references": args.references,
                                                          "--image-list": args.image_list})
        unfinished = not args.coco_server and left_unfinished(Path(args.out), "eval", say=False)
        refuse_existing_in(args.out, output_names(args), args.overwrite or unfinished, "--out")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        raise SaticError(f"--image-root {args.image_root} is not a folder; give the folder the images' file_path "
                         "(in cocotalk.json) is under")
    if args.beam_size is None:
        from satic.evaluation.evaluate import SERVER_BEAM_SIZE

        args.beam_size = SERVER_BEAM_SIZE if args.coco_server else 1
    options = decoding_choices(args)
    if not (args.data or args.coco_server):
        raise SaticError("give --data DIR (a prepared dataset), or --coco-server with --features for server files")
    if args.coco_server:
        return server_main(args, options)
    captioner = load_captioner(args)
    seed_draws(args)  # after loading, which draws the initial weights it then replaces
    with user_outputs(args.overwrite):  # files another command wrote into --out meanwhile are kept
        from satic.evaluation.evaluate import evaluate_split

        result = evaluate_split(captioner, args.data, args.split, args.beam_size, args.batch_size, args.max_images,
                                args.features, args.references, args.out, args.spice, args.precision, args.device,
                                progress=True, overwrite=args.overwrite, image_root=args.image_root, **options)
    from satic.evaluation.metrics import format_table

    print(format_table(result.metrics, result.num_images))
    print(result.latency.describe())
    if result.out_dir is not None:
        print(f"wrote predictions, scores and metrics to {result.out_dir}")
    return 0


SERVER_ONLY = ("alg", "image_list")
SPLIT_ONLY = ("data", "references", "max_images", "spice", "image_root")  # a server file: the whole list, unscored


def check_mode_options(args: argparse.Namespace) -> None:
    """Refuse a mode without what it needs, or with options it would ignore (an --image-list without
    --coco-server does not pick the images scored)."""
    def flags(names, given=True):
        """The command-line spelling of those `names` that were given, even empty (given=False: left out or
        empty)."""
        return ["--" + name.replace("_", "-") for name in names
                if (getattr(args, name) not in (None, False) if given else not getattr(args, name))]

    if args.coco_server:
        if missing := flags(("features", "image_list", "out"), given=False):
            raise SaticError(f"--coco-server also needs {', '.join(missing)}")
        if ignored := flags(SPLIT_ONLY):
            raise ignored_options_error(ignored, "a scored split, not with --coco-server")
    elif ignored := flags(SERVER_ONLY):
        raise ignored_options_error(ignored, "--coco-server server files",
                                    "a split's images come from --data and --split; --max-images takes the first M")


def output_names(args: argparse.Namespace) -> list[str]:
    """The files this command writes into --out."""
    from satic.evaluation.evaluate import EVAL_OUTPUTS
    from satic.evaluation.results import server_results_name

    return [server_results_name(args.coco_server, args.alg)] if args.coco_server else list(EVAL_OUTPUTS)


def server_main(args: argparse.Namespace, options: dict) -> int:
    """The server file: the image list is read, and the store listed, once, before the model loads (a paper-size
    checkpoint takes seconds), and captioning uses both."""
    from satic.data.stores import open_store
    from satic.evaluation.evaluate import check_listed_in_store, server_results
    from satic.evaluation.results import read_image_ids

    image_ids = read_image_ids(args.image_list, args.coco_server)
    with open_store(args.features) as store:
        check_listed_in_store(image_ids, args.image_list, store)
        captioner = load_captioner(args)
        seed_draws(args)  # after loading, which draws the initial weights it then replaces
        with user_outputs(args.overwrite):  # files another command wrote into --out meanwhile are kept
            path = server_results(captioner, store, args.coco_server, args.alg, args.image_list, args.out,
                                  args.beam_size, args.batch_size, args.precision, args.device, progress=True,
                                  overwrite=args.overwrite, image_ids=image_ids, **options)
    print(f"wrote {path}")
    return 0
