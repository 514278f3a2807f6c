"""`satic train CONFIG.yaml [key=value ...]`: train a model (also under torchrun)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from satic.cli import HelpFormatter
from satic.config import find_config, load_config, to_dict
from satic.errors import counted
from satic.training.config import TrainConfig

EPILOG = """\
Overrides use dotted keys, e.g. optim.lr=0.0001 data.batch_size=20 resume=auto; a section given as a
mapping, optim={lr: 0.0001}, is merged into the config file's.
Resume (resume=DIR or resume=auto) restores weights, optimizer, schedule position, RNG states,
data position and best score; the learning rate is then the config's schedule evaluated at the
restored position (the config wins for constants such as lr or warmup, the checkpoint for the
step, epoch and plateau reductions). init_from=DIR loads weights and starts a fresh run; with
init_continue=true (init_from a run's last/) it also continues that run's Adam state, counters,
data position and best score, as the reference's --start_from.
Ctrl-C or SIGTERM saves last/ at the iteration a one-process run stopped at (not validated), as the
reference; resume=auto then continues it exactly (under torchrun last/ stays at the last save).
Multi-process: torchrun --nproc_per_node N -m satic train CONFIG.yaml (data.batch_size is the
global batch)."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="satic train", description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("config", help="YAML config: a file, or the name of one shipped with satic "
                                       "(coco/teacher_xe.yaml, demo/...)")
    parser.add_argument("overrides", nargs="*", default=None, metavar="key=value",  # default: not listed as required
                        help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_intermixed_args(argv)  # overrides may follow an option (`CONFIG --print-config key=value`)
    from satic.training.distributed import launch_world

    rank = launch_world().rank
    path = find_config(args.config)
    if path != Path(args.config) and rank == 0:
        print(f"satic train: {args.config}: no such file here; training with satic's own {path}", file=sys.stderr)
    config = load_config(TrainConfig, path, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    from satic.training.trainer import train

    result = train(config)
    if rank != 0:  # under torchrun every rank returns here; rank 0 speaks for the run
        return 0
    kept = f"checkpoints in {result.out_dir}" if result.last else f"no checkpoint saved in {result.out_dir}"
    print(f"done: {counted(result.iterations, 'iteration')}, {counted(result.epochs, 'epoch')}, best validation "
          f"{result.best_metric} {_fmt(result.best_score)}; {kept}")
    return 0


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.4f}"
