"""The command line: --version, every --help with its defaults, and one-line errors (exit 2) for
outputs, devices and counts that cannot work, raised before any work is done."""
from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from satic.cli import COMMANDS, main
from satic.cli.features import SUBCOMMANDS
from satic.data.stores import create_store
from satic.data.vocab import Vocabulary
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import save_checkpoint

COMMAND_LINES = [[name] for name in COMMANDS if name != "features"] + [["features", s] for s in SUBCOMMANDS]


def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"satic {version('satic')}\n"
    assert main(["--help"]) == 0
    assert "--version" in capsys.readouterr().out
    assert main(["--version", "caption"]) == 0  # what follows --version is not read
    assert capsys.readouterr().out == f"satic {version('satic')}\n"


def test_an_uninstalled_source_tree_reports_its_own_version(tmp_path):
    """Where no metadata names satic (its package folder alone on the path of an interpreter without
    site-packages), --version is the source tree's __version__."""
    import satic

    (tmp_path / "satic").symlink_to(os.path.dirname(satic.__file__))
    program = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from satic.cli import main; sys.exit(main())"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", program, "--version"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"satic {satic.__version__}\n", "")


USAGE = """\
usage: satic [--version] COMMAND [options]   (satic COMMAND --help for each)

commands:
  synth             make the built-in captioning dataset
  prepro            Karpathy split JSON -> vocabulary, labels and CIDEr-D cache
  features          convert, check, import or extract region features
  import-reference  convert a reference-code checkpoint
  export-reference  write a checkpoint in the reference code's format
  caption           caption a feature store or image files
  eval              caption a split and report COCO metrics and latency
  score             score a COCO result file against references
  train             train a model from a YAML config
  distill           make sequence-level distillation labels with a teacher
  demo              run the whole pipeline on the built-in dataset
  build-kernels     build the CPU decoding kernel ahead of the first decode
  serve             caption over HTTP with dynamic batching (satic[serve])

options:
  -h, --help        show this message
  --version         print satic's version
"""


def test_help_lists_every_command_with_what_it_does(capsys):
    assert main(["--help"]) == 0 and main(["-h"]) == 0
    assert capsys.readouterr().out == USAGE + USAGE


def test_the_entry_point_collects_the_commands_garbage_then_spares_the_teardown_its_heap_walk():
    """Once the command is done, `satic` collects the garbage it left (the finaliser of a reference cycle runs, as
    the interpreter's teardown would run it), then freezes every live object, so that the teardown's own
    collections skip torch's heap; the command's output and status are unchanged."""
    program = ("import atexit, gc, sys\n"
               "class Cycle:\n"
               "    def __del__(self):\n"
               "        print('cycle finalised; frozen:', gc.get_freeze_count() > 0, flush=True)\n"
               "gc.disable()\n"
               "cycle = Cycle(); cycle.itself = cycle; del cycle\n"
               "atexit.register(lambda: print('at exit, frozen:', gc.get_freeze_count() > 0, flush=True))\n"
               "from satic.__main__ import run; sys.exit(run())")
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-c", program, "--version"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [f"satic {version('satic')}", "cycle finalised; frozen: False",
                                        "at exit, frozen: True"]


@pytest.mark.parametrize("command", COMMAND_LINES, ids=" ".join)
def test_every_help_documents_each_option_and_its_default(command, help_text, monkeypatch):
    parsers = []
    parse_known_args = argparse.ArgumentParser.parse_known_args  # under parse_args and parse_intermixed_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        return parse_known_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    text = help_text(command)
    assert text.startswith(f"usage: satic {' '.join(command)} ")
    for action in parsers[-1]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{' '.join(command)}: {action.option_strings or action.dest} has no help"
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in text, (command, action.dest)


def test_caption_help_says_where_captions_go_without_out(help_text):
    text = help_text(["caption"])
    assert "(default: print 'ID<tab>caption' lines to stdout)" in text
    assert "Without --out the captions go to stdout" in text
    assert "decoding options (those of the reference's eval.py; off by default, or as the checkpoint records them):" \
        in text


def run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["train", "CONFIG", "out_dir=FILE"], "out_dir FILE is a file; give a directory"),
    (["caption", "--checkpoint", "nowhere", "--features", "nowhere", "--out", "DIR"], "--out DIR is a directory"),
    (["caption", "--checkpoint", "nowhere", "--features", "nowhere", "--out", "FILE/x.json"],
     "--out FILE/x.json is inside FILE, which is a file"),
    (["import-reference", "--model", "m.pth", "--infos", "i.pkl", "--out", "FILE"], "--out FILE is a file"),
    (["prepro", "--karpathy", "nowhere.json", "--out", "FILE"], "output directory FILE is a file"),
    (["eval", "--checkpoint", "nowhere", "--data", "nowhere", "--out", "FILE"], "--out FILE is a file"),
    (["distill", "--teacher", "nowhere", "--data", "nowhere", "--out", "FILE"],
     "--out FILE already exists; give a new path, or pass --overwrite"),
    (["distill", "--teacher", "nowhere", "--data", "nowhere", "--out", "DIR"], "--out DIR is a directory"),
    (["caption", "--checkpoint", "nowhere", "--features", "nowhere", "--out", "FILE"],
     "--out FILE already exists; give a new path, or pass --overwrite to replace it"),
    (["score", "--results", "nowhere", "--references", "nowhere", "--out", "FILE"],
     "--out FILE already exists; give a new path, or pass --overwrite to replace it"),
    (["synth", "", "--images", "10"], "out_dir is empty; give the folder"),  # not the current folder
    (["demo", "--fast", "--out", ""], "--out is empty; give the demo's folder"),  # nor the default one
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    from satic.config import configs_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "DIR").mkdir()
    argv = [str(configs_dir() / "demo" / "teacher_xe.yaml") if a == "CONFIG" else a for a in argv]
    code, err = run(capsys, argv)
    assert code == 2 and message in one_line_error(err)
    assert (tmp_path / "FILE").read_text() == "mine" and list((tmp_path / "DIR").iterdir()) == []


@pytest.mark.parametrize("argv, held", [
    (["eval", "--checkpoint", "nowhere", "--data", "nowhere", "--out", "DIR"], "metrics.json"),
    (["eval", "--checkpoint", "nowhere", "--features", "nowhere", "--coco-server", "test2014", "--alg", "satic-k2",
      "--image-list", "nowhere", "--out", "DIR"], "captions_test2014_satic-k2_results.json"),
    (["prepro", "--karpathy", "nowhere.json", "--out", "DIR"], "cocotalk_label.h5"),
    (["import-reference", "--model", "m.pth", "--infos", "i.pkl", "--out", "DIR"], "config.json"),
])
def test_a_folder_holding_a_commands_outputs_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, held):
    """Each file a command would write into its output folder replaces an earlier one only with --overwrite;
    other files there are fine (and never touched)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    (tmp_path / "DIR" / "notes.txt").write_text("mine")
    (tmp_path / "DIR" / held).write_text("mine")
    code, err = run(capsys, argv)
    assert code == 2
    assert f"DIR already holds {held}; give another directory, or pass --overwrite to replace it" \
        in one_line_error(err)
    assert sorted(p.name for p in (tmp_path / "DIR").iterdir()) == sorted([held, "notes.txt"])
    assert all(p.read_text() == "mine" for p in (tmp_path / "DIR").iterdir())


def test_a_device_that_cannot_be_used_is_named(capsys, monkeypatch):
    code, err = run(capsys, ["caption", "--checkpoint", "nowhere", "--features", "x", "--device", "banana"])
    assert code == 2 and "unknown device 'banana'; use cpu, cuda" in one_line_error(err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["caption", "--features", "x"], ["eval", "--data", "x"]):
        code, err = run(capsys, [*command, "--checkpoint", "nowhere", "--device", "cuda"])
        assert code == 2 and "device 'cuda' asked for, but CUDA is not available" in one_line_error(err)


@pytest.mark.parametrize("command", [["caption", "--features", "x"], ["eval", "--data", "x"]])
def test_max_images_zero_is_refused(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--checkpoint", "nowhere", "--max-images", "0"])
    assert exit_.value.code == 2
    assert "argument --max-images: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["caption", "--features", "x"], ["eval", "--data", "x"]])
def test_a_seed_torch_cannot_take_is_refused(capsys, command):
    with pytest.raises(SystemExit) as exit_:  # torch's generators take 64 bits: it failed with a traceback
        main([*command, "--checkpoint", "nowhere", "--sample-method", "sample", "--seed", str(2**64)])
    assert exit_.value.code == 2
    assert f"argument --seed: must be from {-2**63} to {2**64 - 1}, got {2**64}" in capsys.readouterr().err


@pytest.mark.parametrize("kind, text, expected", [
    ("whole_number", "-3", -3),
    ("whole_number", "2.5", "expected a whole number, got '2.5'"),
    ("seed_number", str(-2**63), -2**63),
    ("seed_number", str(2**64 - 1), 2**64 - 1),
    ("seed_number", str(-2**63 - 1), f"must be from {-2**63} to {2**64 - 1}, got {-2**63 - 1}"),
    ("positive_int", "1", 1),
    ("positive_int", "0", "must be at least 1, got 0"),
    ("non_negative_int", "0", 0),
    ("non_negative_int", "-1", "must be at least 0, got -1"),
    ("non_negative_int", "x", "expected a whole number, got 'x'"),
])
def test_whole_number_arguments_take_their_whole_range_and_name_what_is_outside(kind, text, expected):
    import satic.cli

    parse = getattr(satic.cli, kind)
    if isinstance(expected, int):
        assert parse(text) == expected
    else:
        with pytest.raises(argparse.ArgumentTypeError) as error:
            parse(text)
        assert str(error.value) == expected


@pytest.mark.parametrize("port, message", [("99999", "a TCP port is 0..65535, got 99999"),
                                           ("-1", "a TCP port is 0..65535, got -1"),
                                           ("http", "expected a whole number, got 'http'")])
def test_serve_refuses_a_port_that_cannot_be_bound_before_loading_anything(capsys, port, message):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--checkpoint", "nowhere", "--port", port])
    assert exit_.value.code == 2
    assert f"argument --port: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--data", "d", "--image-list", "ids.txt"],
     "--image-list only applies to --coco-server server files; drop it (a split's images come from --data"),
    (["--data", "d", "--alg", "x", "--image-list", "ids.txt"], "--alg and --image-list only apply to --coco-server"),
    (["--data", "d", "--alg", ""], "--alg only applies to --coco-server"),
    (["--coco-server", "test2014", "--features", "f", "--alg", "x", "--image-list", "ids.txt", "--out", "o",
      "--references", "refs.json"], "--references only applies to a scored split, not with --coco-server; drop it\n"),
    (["--coco-server", "val2014", "--features", "f", "--alg", "x", "--image-list", "ids.txt", "--out", "o",
      "--spice", "--max-images", "5"], "--max-images and --spice only apply to a scored split"),
    (["--coco-server", "test2014", "--features", "f", "--image-list", "ids.txt", "--out", "o", "--data", "d",
      "--image-root", "r"], "--data and --image-root only apply to a scored split, not with --coco-server"),
    (["--coco-server", "test2014"], "--coco-server also needs --features, --image-list, --out\n"),
    (["--coco-server", "test2014", "--image-list", "ids.txt", "--out", ""],
     "--coco-server also needs --features, --out\n"),
    ([], "give --data DIR (a prepared dataset), or --coco-server with --features for server files\n"),
])
def test_eval_refuses_options_its_mode_would_ignore(capsys, extra, message):
    code, err = run(capsys, ["eval", "--checkpoint", "nowhere", *extra])
    assert code == 2 and message in one_line_error(err)


def test_caption_refuses_store_options_with_image_files(capsys):
    code, err = run(capsys, ["caption", "--checkpoint", "nowhere", "a.jpg", "--max-images", "1", "--info", "c.json"])
    assert code == 2 and "--max-images and --info only apply to --features STORE" in one_line_error(err)


def test_caption_takes_image_files_after_a_double_dash(capsys):
    """`--` before names that start with "-": they are image files (here beside a store, which is refused as
    such), not unrecognized arguments."""
    code, err = run(capsys, ["caption", "--checkpoint", "nowhere", "--features", "feats_att", "--", "-a.jpg"])
    assert code == 2 and "give either --features STORE or image files to caption" in one_line_error(err)


def test_train_takes_overrides_after_its_options_too(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text("max_iters: 5\n")
    assert main(["train", str(path), "seed=3", "--print-config", "seed=7", "max_iters=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["seed"], printed["max_iters"]) == (7, 2)  # in the order given


@pytest.mark.parametrize("name", ["configs/coco/teacher_xe.yaml", "coco/teacher_xe.yaml"])
def test_train_reads_a_shipped_config_by_name_outside_the_checkout(tmp_path, monkeypatch, capsys, name):
    """The README's `satic train configs/coco/...` works from any folder (an installed satic has no configs/
    beside it); a file of that name where the command runs is read instead."""
    import yaml

    from satic.config import configs_dir

    monkeypatch.chdir(tmp_path)
    assert main(["train", name, "--print-config"]) == 0
    out, err = capsys.readouterr()
    shipped = yaml.safe_load((configs_dir() / "coco" / "teacher_xe.yaml").read_text())
    assert yaml.safe_load(out)["out_dir"] == shipped["out_dir"] == "runs/coco/teacher_xe"
    assert err == (f"satic train: {name}: no such file here; training with satic's own "
                   f"{configs_dir() / 'coco' / 'teacher_xe.yaml'}\n")
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_text("out_dir: runs/mine\nmax_iters: 1\n")
    assert main(["train", name, "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["out_dir"] == "runs/mine" and err == ""


def test_train_names_the_shipped_configs_when_the_one_given_is_nowhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, ["train", "coco/teacher.yaml"])
    assert code == 2 and one_line_error(err).startswith(
        "satic train: error: config file not found: coco/teacher.yaml; give the path of a YAML config, or the name "
        "of one that satic ships (coco/sat_k2_scst.yaml, ")


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert main([]) == 2
    assert capsys.readouterr().out.startswith("usage: satic [--version] COMMAND [options]")
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("satic: unknown command 'nope'\n\nusage: satic") and "Traceback" not in err


@pytest.fixture()
def fake_command(monkeypatch):
    """`satic fake` runs the `main` given to it (a module of its own in COMMANDS)."""
    import sys
    import types

    module = types.ModuleType("satic_fake_command")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(COMMANDS, "fake", (module.__name__, "a command for this test"))

    def use(body):
        module.main = body
    return use


def test_an_os_error_is_one_line_naming_the_file(fake_command, capsys):
    def body(argv):
        raise PermissionError(13, "Permission denied", "/data/out.json")
    fake_command(body)
    assert main(["fake"]) == 2
    assert one_line_error(capsys.readouterr().err) == "satic fake: error: Permission denied: /data/out.json\n"


def test_satics_warnings_are_one_line_and_others_keep_their_place(fake_command, capsys):
    import warnings
    from pathlib import Path

    import satic
    from satic.cli import PACKAGE

    neighbour = str(Path(satic.__file__).parents[1] / "neighbour" / "lib.py")  # beside satic, not inside it

    def body(argv):
        warnings.warn_explicit("ours says so", UserWarning, str(PACKAGE / "data" / "stores.py"), 10)
        warnings.warn_explicit("a library says so", DeprecationWarning, "/elsewhere/lib.py", 7)
        warnings.warn_explicit("a neighbour says so", UserWarning, neighbour, 3)
    fake_command(body)
    with warnings.catch_warnings(record=True) as shown:  # what reaches Python's own showwarning
        warnings.simplefilter("always")
        before = warnings.showwarning
        assert main(["fake"]) == 0
        assert warnings.showwarning is before  # put back
    assert capsys.readouterr().err == "satic fake: warning: ours says so\n"
    assert [(str(w.message), w.category, w.filename, w.lineno) for w in shown] == [
        ("a library says so", DeprecationWarning, "/elsewhere/lib.py", 7),
        ("a neighbour says so", UserWarning, neighbour, 3)]


def test_satics_warnings_go_on_a_line_of_their_own_under_a_progress_bar(fake_command, capsys):
    """A warning given while a progress bar is drawn (the kernel that cannot be built, at the first caption) is not
    glued to the end of the bar's line."""
    import re
    import warnings

    from tqdm import tqdm

    from satic.cli import PACKAGE

    def body(argv):
        with tqdm(total=2, desc="captioning") as bar:
            warnings.warn_explicit("ours says so", UserWarning, str(PACKAGE / "decoding" / "small_gemm.py"), 10)
            bar.update(2)
    fake_command(body)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["fake"]) == 0
    assert "satic fake: warning: ours says so" in re.split("[\r\n]", capsys.readouterr().err)


def test_help_adds_a_default_only_where_the_help_does_not_say_it(capsys):
    from satic.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="p", formatter_class=HelpFormatter)
    parser.add_argument("--said", type=int, default=3, help="a count (default: three)")
    parser.add_argument("--count", type=int, default=4, help="a count")
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("where", nargs="?", default="here", help="a place")
    parser.add_argument("what", help="a thing")
    text = " ".join(parser.format_help().split())
    assert "a count (default: three) --count" in text and "a count (default: 4)" in text
    assert "a switch (default" not in text
    assert "a place (default: here)" in text and "a thing (default" not in text


@pytest.mark.parametrize("extra, message", [
    (["--seed", "3"], "--seed only applies to --sample-method sample; drop it (greedy and beam search draw nothing)"),
    (["--top-k", "3", "--top-p", "0.9"],
     "--top-k and --top-p only apply to --sample-method sample; drop them (greedy and beam search draw nothing)"),
    (["--sample-method", "sample", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--beam-size", "2", "--sample-method", "sample"], "beam search (--beam-size > 1) needs --sample-method='greedy'"),
    (["--beam-size", "4", "--beam-groups", "3"], "--beam-size (4) must be a multiple of --beam-groups (3)"),
    (["--weights", "1", "2"], "--weights is for an ensemble; give several --checkpoint DIR, or drop --weights"),
    (["--checkpoint", "other", "--weights", "1"],
     "--weights: expected 2 positive finite numbers, one per --checkpoint, got 1.0"),
    (["--checkpoint", "other", "--weights", "1", "-2"],
     "--weights: expected 2 positive finite numbers, one per --checkpoint, got 1.0 -2.0"),
    (["--checkpoint", "other", "--weights", "0", "1"],
     "--weights: expected 2 positive finite numbers, one per --checkpoint, got 0.0 1.0"),
    (["--checkpoint", "other", "--weights", "1", "inf"],
     "--weights: expected 2 positive finite numbers, one per --checkpoint, got 1.0 inf"),
    (["--checkpoint", "other", "--weights", "0.5", "2"],  # accepted: the checkpoints are then read
     "checkpoint directory not found: nowhere (give the folder that holds config.json and model.safetensors)"),
])
def test_decoding_flags_are_checked_before_anything_loads(capsys, extra, message):
    code, err = run(capsys, ["caption", "--checkpoint", "nowhere", "--features", "nowhere", *extra])
    assert code == 2 and one_line_error(err) == f"satic caption: error: {message}\n"


@pytest.mark.parametrize("argv, choices, beam_size", [
    ([], {}, 1),
    (["--sample-method", "sample", "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9", "--seed", "7",
      "--max-length", "9", "--decoding-constraint", "--block-trigrams", "--remove-bad-endings"],
     {"sample_method": "sample", "temperature": 0.5, "top_k": 3, "top_p": 0.9, "max_length": 9,
      "decoding_constraint": True, "block_trigrams": True, "remove_bad_endings": True}, 1),
    (["--beam-size", "4", "--beam-groups", "2", "--diversity-lambda", "0.25", "--length-penalty", "wu_0.9"],
     {"beam_groups": 2, "diversity_lambda": 0.25, "length_penalty": "wu_0.9"}, 4),
    (["--length-penalty", "none", "--no-remove-bad-endings", "--threads", "3"],
     {"length_penalty": "", "remove_bad_endings": False}, 1),
])
def test_the_decoding_flags_given_and_only_those_become_decode_options(argv, choices, beam_size):
    """Flags left out leave the checkpoint's defaults in place; --beam-size, --batch-size, --precision and --device
    are the command's own, with their defaults."""
    from satic.cli import add_decoding_arguments, decoding_choices

    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser, "of the store")
    args = parser.parse_args(argv)
    assert decoding_choices(args) == choices
    assert (args.beam_size, args.batch_size, args.precision, args.device) == (beam_size, 50, "fp32", "cpu")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("argv, message", [
    (["caption", "--checkpoint", "nowhere", "--features", "nowhere", "--out", "/dev/null"],
     "--out /dev/null is a character device, not a regular file; give a file path (without --out, caption prints "
     "to stdout)"),
    (["caption", "--checkpoint", "nowhere", "--features", "nowhere", "--out", "PIPE"],
     "--out PIPE is a named pipe (FIFO), not a regular file; give a file path"),
    (["score", "--results", "nowhere", "--references", "nowhere", "--out", "LINK"],
     "--out LINK (a link to TMP/PIPE) is a named pipe (FIFO), not a regular file; give a file path"),
    (["distill", "--teacher", "nowhere", "--data", "nowhere", "--out", "DANGLING"],
     "--out DANGLING is a symbolic link to nowhere, which does not exist; give a file path, or create the link's"),
    (["eval", "--checkpoint", "nowhere", "--data", "nowhere", "--out", "DIR"],
     "output DIR/metrics.json is a named pipe (FIFO), not a regular file; move it away, or give another --out"),
    (["import-reference", "--model", "m.pth", "--infos", "i.pkl", "--out", "PIPE"],
     "--out PIPE is a named pipe (FIFO), not a regular file; give a directory"),
])
def test_an_output_that_is_no_regular_file_is_refused_with_or_without_overwrite(tmp_path, capsys, monkeypatch, argv,
                                                                                message, overwrite):
    """A device, FIFO or dangling link at --out is never replaced by a file (`--out /dev/stdout --overwrite` as
    root replaced /dev/stdout), and the message does not suggest --overwrite."""
    monkeypatch.chdir(tmp_path)
    os.mkfifo("PIPE")
    os.symlink("PIPE", "LINK")
    os.symlink("nowhere", "DANGLING")
    (tmp_path / "DIR").mkdir()
    os.mkfifo("DIR/metrics.json")
    code, err = run(capsys, argv + overwrite)
    assert code == 2 and message.replace("TMP", str(tmp_path)) in one_line_error(err) and "--overwrite" not in err
    assert stat.S_ISFIFO(os.lstat("PIPE").st_mode) and stat.S_ISFIFO(os.lstat("DIR/metrics.json").st_mode)
    assert os.readlink("LINK") == "PIPE" and os.readlink("DANGLING") == "nowhere"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(os.listdir()) == ["DANGLING", "DIR", "LINK", "PIPE"] and os.listdir("DIR") == ["metrics.json"]


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`satic caption ... | head -1`: the closed pipe ends the command as it ends any pipe's writer, exit 141
    (128 + SIGPIPE), with no error and no traceback from the flush at exit."""
    import os
    import subprocess
    import sys

    script = ("import sys, types; from satic.cli import COMMANDS, main; module = types.ModuleType('lines'); "
              "module.main = lambda argv: [print('caption', i) for i in range(10**6)] and 0; "
              "sys.modules['lines'] = module; COMMANDS['lines'] = ('lines', ''); sys.exit(main(['lines']))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline() == b"caption 0\n"
    child.stdout.close()
    assert child.wait(timeout=60) == 141
    assert child.stderr.read() == b""


def test_help_to_a_reader_that_has_gone_ends_quietly():
    """`satic --help | true`: the usage written into a pipe whose reader has already gone ends the command as a pipe's
    writer ends, exit 141, with nothing on stderr (not a second error from the flush at exit)."""
    child = subprocess.Popen([sys.executable, "-m", "satic", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    child.stdout.close()  # long before the child writes
    assert child.wait(timeout=60) == 141
    assert child.stderr.read() == b""


def lines_program(body: str) -> list[str]:
    """A process whose `satic lines` command runs `body`, the source of the command's `main(argv)`."""
    return [sys.executable, "-c", "import sys, types\nfrom satic.cli import COMMANDS, main\n"
            f"{body}\nmodule = types.ModuleType('lines'); module.main = main_of_lines\n"
            "sys.modules['lines'] = module; COMMANDS['lines'] = ('lines', ''); sys.exit(main(['lines']))"]


def test_a_broken_pipe_other_than_a_live_stdout_pipe_is_an_error():
    """stdout a pipe whose reader is still there: a BrokenPipeError from elsewhere (a child process's pipe) is the
    command's error, exit 2, not taken for a reader of stdout that stopped early."""
    body = "def main_of_lines(argv):\n    raise BrokenPipeError(32, 'Broken pipe')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(lines_program(body), env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", "satic lines: error: Broken pipe\n")


@pytest.mark.parametrize("encoding, printed", [
    ("ascii", b"caf\\xe9 \\udce9\n"),  # strict: backslash escapes
    ("ascii:surrogateescape", b"caf\\xe9 \xe9\n"),  # a file name's undecodable byte written back as it was read
    ("ascii:replace", b"caf? ?\n"),  # a handler that never fails is kept
    ("utf-8", "café \\udce9\n".encode()),
], ids=["ascii", "ascii-surrogateescape", "ascii-replace", "utf-8"])
def test_text_stdout_cannot_encode_is_escaped_and_a_name_read_as_bytes_written_back(encoding, printed):
    """A command's print of text its stdout cannot encode ("é" under ASCII, or a file name's byte 0xE9 that the locale
    decoded to the surrogate U+DCE9) ends neither in a traceback nor in lost output."""
    body = "def main_of_lines(argv):\n    print('caf\\xe9 \\udce9')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONIOENCODING=encoding)
    done = subprocess.run(lines_program(body), env=env, capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, printed, b"")


def test_only_the_surrogates_of_undecodable_bytes_are_written_back_as_bytes():
    """satic's error handler for stdout (registered by satic.cli): U+DC80..U+DCFF, which stand for the bytes
    0x80..0xFF a locale could not decode, are written back as those bytes; other text is escaped."""
    text = "\udc80\udcff\udd00\udc7f é-ok"  # only U+DC80..U+DCFF stand for the bytes 0x80..0xFF
    assert text.encode("ascii", "satic.bytes_or_escapes") == b"\x80\xff\\udd00\\udc7f \\xe9-ok"


FULL_DISK = "cannot write to standard output: No space left on device; make room where it is redirected\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["lines"], ["caption", "--help"]])
def test_stdout_on_a_full_disk_is_named_in_one_line(argv):
    """stdout redirected to a full disk (/dev/full): a message naming stdout and exit 2, where the flush at exit
    used to end in a traceback, or lose the lines a command printed without a word."""
    script = ("import sys, types; from satic.cli import COMMANDS, main; module = types.ModuleType('lines'); "
              "module.main = lambda argv: [print('caption', i) for i in range(10)] and 0; "
              f"sys.modules['lines'] = module; COMMANDS['lines'] = ('lines', ''); sys.exit(main({argv!r}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("PYTHONUNBUFFERED", None)  # stdout buffered, as Python has it by default: the lines fail at the flush
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", script], env=env, stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    name = "satic" if argv[0].startswith("-") else f"satic {argv[0]}"
    assert (done.returncode, one_line_error(done.stderr)) == (2, f"{name}: error: {FULL_DISK}")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_captions_printed_to_a_full_disk_name_stdout(tmp_path):
    """`satic caption` prints as it goes: the write stdout refuses part way is named, where it said only "No space
    left on device"."""
    model = SATModel(ModelConfig(vocab_size=4, num_layers=1, d_model=8, d_ff=8, num_heads=2, att_feat_size=4,
                                 max_positions=16))
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, Vocabulary(("a", "b", "c", "d")))
    with create_store(tmp_path / "feats.h5", "hdf5") as writer:
        for i in range(600):  # more lines than stdout's buffer holds
            writer.add(f"{i:040d}", np.ones((3, 4), np.float32))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "satic", "caption", "--checkpoint", str(checkpoint), "--features",
                               str(tmp_path / "feats.h5"), "--max-length", "3", "--batch-size", "100"],
                              env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"\nsatic caption: error: {FULL_DISK}" in done.stderr


def test_a_broken_pipe_other_than_stdout_is_an_error(fake_command, capsys):
    def body(argv):
        raise BrokenPipeError(32, "Broken pipe")  # a child process's pipe, say: stdout is fine
    fake_command(body)
    assert main(["fake"]) == 2
    assert one_line_error(capsys.readouterr().err) == "satic fake: error: Broken pipe\n"


def test_main_called_from_python_puts_back_what_it_changed_for_the_command(fake_command, capsys, monkeypatch):
    """main(argv) from Python (a notebook, a test): the signal handlers, the hook for exceptions Python cannot raise,
    warnings' showwarning and stdout's error handler are the caller's again afterwards, no import hook is left
    behind, and an exception raised in a finalizer that no signal caused still reaches the caller's hook."""
    import signal
    import warnings

    reported = []

    def hook(report):
        reported.append(repr(report.exc_value))

    class Finalized:
        def __init__(self, error: BaseException):
            self.error = error

        def __del__(self):
            raise self.error

    seen = []

    def body(argv):
        seen.append(sys.stdout.errors)
        Finalized(ValueError("in a finalizer"))
        Finalized(KeyboardInterrupt())
    fake_command(body)
    monkeypatch.setattr(sys, "unraisablehook", hook)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    meta_path, show_warning, errors = list(sys.meta_path), warnings.showwarning, sys.stdout.errors
    assert main(["fake"]) == 0
    assert seen == ["backslashreplace"] and sys.stdout.errors == errors == "strict"
    assert reported == ["ValueError('in a finalizer')", "KeyboardInterrupt()"]
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
    assert (sys.unraisablehook, warnings.showwarning, sys.meta_path) == (hook, show_warning, meta_path)


@pytest.mark.parametrize("sig, status, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_whose_exception_the_command_swallowed_still_stops_it(fake_command, capsys, sig, status, said):
    """Code that catches the signal's exception and goes on (as torch's C++ start-up clears a Python error raised in
    it) does not make the command succeed: it ends, once its main returns, with its one line and 128 + the signal."""
    import signal

    def body(argv):
        try:
            signal.raise_signal(getattr(signal, sig))
        except KeyboardInterrupt:
            pass
        return 0
    fake_command(body)
    assert main(["fake"]) == status
    assert capsys.readouterr().err == f"satic fake: {said}\n"


def test_numpy_and_torch_load_whole_from_the_finder_that_would_have_found_them(monkeypatch):
    """The satic program's import hook asks the finders after it for numpy and torch, in their order, and runs the
    loader found with Ctrl-C held until the module is loaded; a loader without exec_module (the old protocol), and
    every other module, are left to the finders as they are."""
    import importlib.abc
    import importlib.util
    import signal
    import types

    from satic.cli import _WholeImports

    class Loader(importlib.abc.Loader):
        def exec_module(self, module):
            signal.raise_signal(signal.SIGINT)
            module.whole = True

    class OldLoader:
        def load_module(self, name):
            raise ImportError(name)

    loaders = {"numpy": Loader(), "torch": OldLoader()}

    class Finder:
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, loaders[name]) if name in loaders else None

    hook = _WholeImports()
    monkeypatch.setattr(sys, "meta_path", [hook, Finder(), *sys.meta_path])
    spec = hook.find_spec("numpy")
    assert spec.loader is loaders["numpy"]
    module = types.ModuleType("numpy")
    with pytest.raises(KeyboardInterrupt):
        spec.loader.exec_module(module)
    assert module.whole
    assert hook.find_spec("torch").loader is loaders["torch"] and not hasattr(loaders["torch"], "exec_module")
    assert hook.find_spec("json") is None


@pytest.mark.parametrize(("command", "given", "missing"), [
    ("train", [], "config"),  # the overrides are optional: argparse would list a '*' positional without a default too
    ("prepro", ["--out", "out"], "--karpathy"),
    ("prepro", ["--karpathy", "dataset_coco.json"], "--out"),
    ("score", ["--references", "refs.json"], "--results"),
    ("score", ["--results", "res.json"], "--references"),
    ("import-reference", ["--infos", "infos.pkl", "--out", "out"], "--model"),
    ("import-reference", ["--model", "model-best.pth", "--out", "out"], "--infos"),
    ("import-reference", ["--model", "model-best.pth", "--infos", "infos.pkl"], "--out"),
    ("caption", ["--features", "feats_att"], "--checkpoint"),
    ("synth", ["--images", "30"], "out_dir"),
    ("export-reference", ["--out", "ref"], "--checkpoint"),
    ("export-reference", ["--checkpoint", "ckpt"], "--out"),
    ("features import-tsv", ["feats.tsv"], "--out"),
])
def test_a_command_asks_for_what_it_needs_and_only_that(capsys, command, given, missing):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), *given])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"satic {command}: error: the following arguments are required: {missing}"


def test_eval_refuses_an_out_that_would_replace_its_references(tmp_path, capsys):
    refs = tmp_path / "predictions.json"
    refs.write_text('{"annotations": []}')
    code, err = run(capsys, ["eval", "--checkpoint", "nowhere", "--data", "nowhere", "--references", str(refs),
                             "--out", str(tmp_path), "--overwrite"])
    assert (code, one_line_error(err)) == (2, f"satic eval: error: --out {refs} is the --references file {refs}, "
                                              "which this command reads; give --out another path\n")
    assert refs.read_text() == '{"annotations": []}'


@pytest.mark.parametrize("closed, out", [((1,), False), ((2,), True), ((0, 1, 2), True)])
def test_a_closed_standard_stream_is_taken_as_dev_null(tmp_path, closed, out):
    """`satic caption ... >&-` (or 2>&-, <&-): the command runs as with /dev/null there, where its captions,
    progress bar and messages go nowhere, and writes --out, instead of ending at the first write to the closed
    stream with a traceback."""
    model = SATModel(ModelConfig(vocab_size=4, num_layers=1, d_model=8, d_ff=8, num_heads=2, att_feat_size=4,
                                 max_positions=16))
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, Vocabulary(("a", "b", "c", "d")))
    with create_store(tmp_path / "feats.h5", "hdf5") as writer:
        writer.add("7", np.ones((3, 4), np.float32))
    argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(tmp_path / "feats.h5"), "--max-length", "3"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "satic", *argv, *(["--out", "captions.json"] if out else [])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: [os.close(fd) for fd in closed])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    if out:
        assert [row["image_id"] for row in json.loads((tmp_path / "captions.json").read_text())] == [7]


def test_a_deleted_current_folder_is_named_before_torch_is_imported(tmp_path):
    """Run from a folder deleted under the shell, torch's import stops the process with a message about its math
    library ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"); satic says what is wrong instead."""
    gone = tmp_path / "gone"
    gone.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "satic", "caption", "--checkpoint", str(tmp_path / "ckpt"),
                           str(tmp_path / "a.png")], cwd=gone, preexec_fn=lambda: os.rmdir(gone), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr == ("satic caption: error: the current folder no longer exists (it was deleted); cd into an "
                           "existing folder and run the command again\n")
