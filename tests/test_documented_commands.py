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


def inline_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `satic`) for each `satic COMMAND ...` code span in the text that gives the command an
    argument (`satic synth DIR`); a span of a name alone, or of a name and an option (`satic caption --out`), names
    them rather than showing a command."""
    from satic.cli import COMMANDS as NAMES

    found = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for span in re.findall(r"`(satic [^`<]+)`", text):
            words = shlex.split(span)[1:]
            rest = words[2:] if words[0] == "features" else words[1:]
            if words[0] in NAMES and any(not w.startswith("-") for w in rest):
                found.append((f"{doc.name}: {' '.join(words)[:70]}", words))
    return found


COMMANDS = documented_commands()
INLINE = inline_commands()


class Parsed(Exception):
    """Raised right after a command's arguments parse, so nothing runs."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def test_the_docs_show_every_kind_of_command():
    shown = {argv[0] for _, argv in COMMANDS}
    assert {"prepro", "features", "train", "distill", "eval", "caption", "import-reference", "serve"} <= shown
    assert len(COMMANDS) >= 25


def parsed_arguments(argv: list[str], monkeypatch, capsys) -> argparse.Namespace:
    """The namespace `satic ARGV` parses to; the command itself does not run."""
    for name in ("parse_args", "parse_intermixed_args"):  # the latter: positionals on either side of options
        def parse_then_stop(self, args=None, namespace=None, parse=getattr(argparse.ArgumentParser, name)):
            raise Parsed(parse(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, name, parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        satic_main(argv)
    assert "error" not in capsys.readouterr().err
    return parsed.value.namespace


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_a_documented_command_parses(argv, monkeypatch, capsys):
    args = parsed_arguments(argv, monkeypatch, capsys)
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


def test_the_docs_write_commands_inline_too():
    shown = {argv[0] for _, argv in INLINE}
    assert {"synth", "export-reference", "train", "caption"} <= shown


@pytest.mark.parametrize("argv", [argv for _, argv in INLINE], ids=[where for where, _ in INLINE])
def test_a_command_written_inline_parses(argv, monkeypatch, capsys):
    args = parsed_arguments(argv, monkeypatch, capsys)  # placeholders (DIR, CONFIG) name no file: parsing only
    if argv[0] == "caption":
        from satic.cli.caption import check_inputs

        check_inputs(args)


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
