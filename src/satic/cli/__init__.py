"""The `satic` command: one subcommand per module in this folder, each with `main(argv) -> int`."""
from __future__ import annotations

import importlib
import sys

from satic.errors import SaticError

COMMANDS = {
    "synth": ("satic.cli.synth", "make the built-in captioning dataset"),
    "prepro": ("satic.cli.prepro", "Karpathy split JSON -> vocabulary, labels and CIDEr-D cache"),
    "features": ("satic.cli.features", "convert, check, import or extract region features"),
    "import-reference": ("satic.cli.import_reference", "convert a reference-code checkpoint"),
    "caption": ("satic.cli.caption", "caption a feature store or image files"),
    "eval": ("satic.cli.eval", "caption a split and report COCO metrics and latency"),
    "score": ("satic.cli.score", "score a COCO result file against references"),
    "train": ("satic.cli.train", "train a model from a YAML config"),
    "distill": ("satic.cli.distill", "make sequence-level distillation labels with a teacher"),
    "demo": ("satic.cli.demo", "run the whole pipeline on the built-in dataset"),
}


def usage() -> str:
    lines = ["usage: satic COMMAND [options]   (satic COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<17} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"satic: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except SaticError as err:
        print(f"satic {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"satic {name}: interrupted", file=sys.stderr)
        return 130
