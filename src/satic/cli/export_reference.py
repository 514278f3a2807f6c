"""`satic export-reference`: a satic checkpoint -> the reference code's model-best.pth + infos_<id>-best.pkl."""
from __future__ import annotations

import argparse
import json
import math
import pickle

from satic.cli import HelpFormatter
from satic.errors import SaticError, counted
from satic.io import (check_output_dir, left_unfinished, refuse_existing_in, staged_outputs,
                      torch_save, unfinished_set)

EPILOG = """\
The reference's eval.py then evaluates the exported model, e.g.
  python eval.py --model OUT/model-best.pth --infos_path OUT/infos_ID-best.pkl --beam_size 1
The reference's eval.py refuses data paths on its command line that differ from those in the infos
file, so give them here as it will find them (the defaults are its standard layout). Only models with 8
attention heads (the reference's fixed number) can be exported."""


def main(argv: list[str]) -> int:
    from satic.model.reference import REFERENCE_DATA_PATHS, REFERENCE_POSITIONS

    parser = argparse.ArgumentParser(prog="satic export-reference", description=__doc__, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="satic checkpoint directory")
    parser.add_argument("--out", required=True, help="directory for model-best.pth and infos_<id>-best.pkl")
    parser.add_argument("--id", help="the run id in the infos file and its name (default: satic-k<K>)")
    paths = parser.add_argument_group("data paths recorded in the infos file (the reference's options)")
    for option, default in REFERENCE_DATA_PATHS.items():
        paths.add_argument("--" + option.replace("_", "-"), default=default, help=f"the reference's --{option}")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    args = parser.parse_args(argv)
    if not args.out:  # Path("") is the current folder, and f"{''}/model-best.pth" the root's
        raise SaticError("--out is empty; give the directory for model-best.pth and infos_<id>-best.pkl")
    out = check_output_dir(args.out, "--out")
    from satic.model.checkpoint import load_checkpoint
    from satic.model.reference import reference_infos, reference_state_dict

    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint.config
    run_id = f"satic-k{config.group_size}" if args.id is None else args.id
    if not run_id or any(c in run_id for c in "/\\") or run_id.strip() != run_id or not run_id.isprintable():
        raise SaticError(f"--id {run_id!r}: give a non-empty name without slashes, surrounding spaces or control "
                         "characters, in UTF-8")
    names = ("model-best.pth", f"infos_{run_id}-best.pkl")
    unfinished = left_unfinished(out, "export-reference")
    refuse_existing_in(args.out, names, args.overwrite or unfinished, "--out")
    others = sorted(p.name for p in out.glob("infos_*-best.pkl") if p.name != names[1])
    if others and (out / names[0]).exists():  # --overwrite: their model-best.pth would be replaced under them
        raise SaticError(f"--out {out} holds {', '.join(others)}, the infos of the model-best.pth this export would "
                         f"replace, which would then describe other weights; export with the --id of that run, "
                         "into another --out, or remove them first")
    state = reference_state_dict(checkpoint.model)
    where = f"{args.checkpoint}/config.json"
    # one group of K words at least, as import-reference requires; the reference decodes at most its position table
    max_length = _whole_number(checkpoint.extra.get("decode", {}), "decode.max_length", 20, config.group_size, where)
    if math.ceil(max_length / config.group_size) * config.group_size > REFERENCE_POSITIONS:
        raise SaticError(f"{where}: extra.decode.max_length {max_length} does not fit the reference's "
                         f"{REFERENCE_POSITIONS} positions in groups of K={config.group_size}; give at most "
                         f"{REFERENCE_POSITIONS // config.group_size * config.group_size} there, or re-save the "
                         "checkpoint")
    # a teacher imported from the reference's TransformerModel goes back as one (its SAT K=1 twin decodes the
    # same captions but fails past 40 positions)
    source = checkpoint.extra.get("source")
    options = source.get("options") if isinstance(source, dict) else None
    imported_from = options.get("caption_model") if isinstance(options, dict) else None
    caption_model = "transformer" if imported_from == "transformer" and config.group_size == 1 else "sat"
    infos = reference_infos(config, checkpoint.vocab, checkpoint.features.use_box, checkpoint.features.norm_att_feat,
                            max_length, run_id, {k: getattr(args, k) for k in REFERENCE_DATA_PATHS},
                            _whole_number(checkpoint.extra, "iteration", 0, 0, where),
                            _whole_number(checkpoint.extra, "epoch", 0, 0, where),
                            caption_model, checkpoint.extra.get("decode"))
    # both or neither; without --overwrite, an export another command wrote into --out meanwhile is kept
    with (unfinished_set(out, "export-reference"),
          staged_outputs(replace=args.overwrite or unfinished) as stage):
        torch_save(state, stage(out / names[0]))
        with open(stage(out / names[1]), "wb") as f:
            pickle.dump(infos, f, protocol=2)  # the reference's own protocol (six's cPickle)
    print(f"wrote {out / names[0]} and {out / names[1]}: K={config.group_size}, "
          f"{counted(config.num_layers, 'layer')}, d_model {config.d_model}, {len(checkpoint.vocab)} words, "
          f"max_length {max_length}")
    return 0


def _whole_number(values: dict, key: str, default: int, least: int, where: str) -> int:
    """extra[key] of a checkpoint's config (key "decode.max_length": extra.decode's), a whole number from `least`."""
    name = key.rpartition(".")[2]
    value = values.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        got = json.dumps(value) if name in values else f"none, so {default}"
        raise SaticError(f"{where}: extra.{key} must be a whole number from {least}, got {got}; set it "
                         "or re-save the checkpoint")
    return value
