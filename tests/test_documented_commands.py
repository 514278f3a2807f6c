"""Every `satic` command the README and docs/ show parses as written, and every config they train from
loads: a flag renamed or a config key moved in the code fails here, not in a reader's terminal."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from satic.cli import main as satic_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `satic`) for each satic command in a ```bash block, continuations joined."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = [w for w in shlex.split(line, comments=True) if w != "&"]
                if "satic" in words and (words[0] == "satic" or words[words.index("satic") - 1] == "-m"):
                    found.append((f"{doc.name}: {' '.join(words)[:70]}", words[words.index("satic") + 1:]))
    return found


COMMANDS = documented_commands()


class Parsed(Exception):
    """Raised right after a command's arguments parse, so nothing runs."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def test_the_docs_show_every_kind_of_command():
    shown = {argv[0] for _, argv in COMMANDS}
    assert {"prepro", "features", "train", "distill", "eval", "caption", "import-reference", "serve"} <= shown
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_a_documented_command_parses(argv, monkeypatch, capsys):
    for name in ("parse_args", "parse_intermixed_args"):  # the latter: positionals on either side of options
        def parse_then_stop(self, args=None, namespace=None, parse=getattr(argparse.ArgumentParser, name)):
            raise Parsed(parse(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, name, parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        satic_main(argv)
    assert "error" not in capsys.readouterr().err
    args = parsed.value.namespace
    if argv[0] == "eval":  # the checks each command makes of its arguments before reading any file
        from satic.cli.eval import check_mode_options

        check_mode_options(args)
    if argv[0] == "caption":
        from satic.cli.caption import check_inputs

        check_inputs(args)
    if argv[0] == "train":
        from satic.config import load_config
        from satic.training.config import TrainConfig

        load_config(TrainConfig, ROOT / args.config, args.overrides)


def test_the_serving_docs_list_the_defaults_satic_serve_uses():
    from satic.cli.serve import build_parser
    from satic.serve.settings import Limits, ServeSettings

    text = (ROOT / "docs" / "serving.md").read_text()
    documented = dict(re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+?) \|", text, re.M))
    used = {action.option_strings[0]: action.default for action in build_parser()._actions if action.option_strings}
    assert len(documented) == 16
    for option, default in documented.items():
        value = used[option] if option != "--max-regions" else Limits().max_regions  # a grid model's may be more
        if value is None:  # --threads
            assert default == "torch's", option
        else:
            assert (default.split()[0] == value if isinstance(value, str) else float(default.split()[0]) == value), \
                option
    assert f"503 with `Retry-After: {ServeSettings().retry_after_s}`" in text
