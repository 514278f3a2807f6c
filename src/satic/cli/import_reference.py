"""`satic import-reference`: the reference code's model-best.pth + infos_<id>-best.pkl -> a satic checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

from satic.cli import HelpFormatter
from satic.decoding.options import checkpoint_defaults
from satic.errors import counted
from satic.io import (check_output_dir, left_unfinished, refuse_existing_in, unfinished_set,
                      user_outputs)
from satic.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, FeatureSpec, save_checkpoint
from satic.model.reference import load_reference_state_dict, model_from_reference, read_reference_infos


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="satic import-reference",
                                     description="convert a checkpoint saved by the reference code (YuanEZhou/satic)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="the reference's model-best.pth (a state_dict)")
    parser.add_argument("--infos", required=True, help="the reference's infos_<id>-best.pkl (options and vocabulary)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")  # before any conversion
    unfinished = left_unfinished(Path(args.out), "import-reference")
    refuse_existing_in(args.out, (WEIGHTS_FILE, CONFIG_FILE), args.overwrite or unfinished, "--out")
    infos = read_reference_infos(args.infos)
    model, vocab, options = model_from_reference(load_reference_state_dict(args.model), infos, args.model, args.infos)
    features = FeatureSpec(kind="bottom-up", norm_att_feat=bool(options.get("norm_att_feat", False)),
                           use_box=bool(options.get("use_box", False)))
    extra = {
        "source": {"format": "reference", "model": str(args.model), "infos": str(args.infos),
                   "iteration": infos.get("iter"), "epoch": infos.get("epoch"),
                   "options": {k: v for k, v in options.items() if k != "decode_max_length"}},
        # decoding options the reference's eval.py takes from the infos (it refuses others on its command line)
        "decode": checkpoint_defaults(options["decode_max_length"], str(options.get("length_penalty") or ""),
                                      bool(options.get("remove_bad_endings"))),
    }
    # a checkpoint another command wrote into --out meanwhile is kept
    with user_outputs(args.overwrite or unfinished), unfinished_set(args.out, "import-reference"):
        save_checkpoint(args.out, model, vocab, features, extra)
    c = model.config
    print(f"wrote {args.out}: K={c.group_size}, {counted(c.num_layers, 'layer')}, d_model {c.d_model}, "
          f"{len(vocab)} words, {c.att_feat_size}-dim {features.kind} features, "
          f"max_length {options['decode_max_length']}")
    return 0
