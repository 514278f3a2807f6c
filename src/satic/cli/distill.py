"""`satic distill`: sequence-level distillation labels from a teacher's beam search."""
from __future__ import annotations

import argparse

from satic.cli import (HelpFormatter, add_recorded_decoding_arguments, add_threads_argument, positive_int,
                       use_threads)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="satic distill", description=__doc__, formatter_class=HelpFormatter,
        epilog="Training images (train + restval) get the teacher's captions; val and test keep the human ones. "
               "Train a student on the result with data.labels=LABELS.h5. A run that is stopped (Ctrl-C, SIGTERM) "
               "keeps the captions decoded so far in OUT.partial.npz (a killed one, those of its last save there, made "
               "every minute), and the same command goes on from them to the same labels; with --overwrite it starts "
               "afresh.",
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder (e.g. RUN/best)")
    parser.add_argument("--data", required=True, help="prepared data folder (cocotalk.json, cocotalk_label.h5)")
    parser.add_argument("--features", help="region-feature store (default: the built-in layout's DATA/feats_att, "
                                           "or DATA/grid_att for a teacher trained on grid features)")
    parser.add_argument("--out", required=True, help="output label file, e.g. "
                        "cocotalk_seq-kd-from-nsc-transformer-baseline-b5_label.h5")
    parser.add_argument("--beam-size", type=positive_int, default=5, help="the teacher's beam width")
    parser.add_argument("--n-best", type=positive_int,
                        help="captions per training image, best first (default: the beam size, every finished "
                             "beam, as the reference's seq-KD labels; 1 keeps only the best)")
    parser.add_argument("--max-length", type=positive_int,
                        help="decode length (default: the teacher's, as eval; 20 if it records none); captions are "
                             "cut to the labels'")
    add_recorded_decoding_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images decoded at once")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_threads_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    from satic.io import user_outputs
    from satic.training.distill import make_seqkd_labels

    use_threads(args.threads)
    with user_outputs(args.overwrite):  # a label file another command wrote at --out meanwhile is kept
        report = make_seqkd_labels(args.teacher, args.data, args.out, args.features, args.beam_size,
                                   args.batch_size, args.max_length, args.n_best, args.device,
                                   overwrite=args.overwrite, length_penalty=args.length_penalty,
                                   remove_bad_endings=args.remove_bad_endings)
    print(f"wrote {report.out}: teacher captions for {report.images} training images"
          + (f" ({report.kept_human} empty ones kept their human captions)" if report.kept_human else ""))
    return 0
