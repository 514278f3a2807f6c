"""The `satic` command: one subcommand per module in this folder, each with `main(argv) -> int`."""
from __future__ import annotations

import _thread
import argparse
import codecs
import contextlib
import errno
import importlib
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator

from satic.errors import SaticError

PACKAGE = Path(__file__).resolve().parents[1]  # src/satic: where satic's own warnings come from
COMMANDS = {
    "synth": ("satic.cli.synth", "make the built-in captioning dataset"),
    "prepro": ("satic.cli.prepro", "Karpathy split JSON -> vocabulary, labels and CIDEr-D cache"),
    "features": ("satic.cli.features", "convert, check, import or extract region features"),
    "import-reference": ("satic.cli.import_reference", "convert a reference-code checkpoint"),
    "export-reference": ("satic.cli.export_reference", "write a checkpoint in the reference code's format"),
    "caption": ("satic.cli.caption", "caption a feature store or image files"),
    "eval": ("satic.cli.eval", "caption a split and report COCO metrics and latency"),
    "score": ("satic.cli.score", "score a COCO result file against references"),
    "train": ("satic.cli.train", "train a model from a YAML config"),
    "distill": ("satic.cli.distill", "make sequence-level distillation labels with a teacher"),
    "demo": ("satic.cli.demo", "run the whole pipeline on the built-in dataset"),
    "build-kernels": ("satic.cli.build_kernels", "build the CPU decoding kernel ahead of the first decode"),
    "serve": ("satic.cli.serve", "caption over HTTP with dynamic batching (satic[serve])"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every subcommand's --help: descriptions as written, and each option's default after its help
    (unless the help already says what happens by default, or the option is a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or any(default is v for v in (None, False, argparse.SUPPRESS))
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def whole_number(text: str) -> int:
    """`text` as an int, for argparse types that then check its range."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def seed_number(text: str) -> int:
    """argparse type for a seed of torch's generators, which take a 64-bit number (a negative one wraps)."""
    value = whole_number(text)
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be from {-2**63} to {2**64 - 1}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts and sizes that must be at least 1."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for seeds and other whole numbers that must be at least 0."""
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def ignored_options_error(flags: list[str], applies_to: str, note: str = "") -> SaticError:
    """The error for options the chosen mode would ignore: "--a and --b only apply to X; drop them (note)"."""
    verb, pronoun = ("apply", "them") if len(flags) > 1 else ("applies", "it")
    return SaticError(f"{' and '.join(flags)} only {verb} to {applies_to}; drop {pronoun}"
                      + (f" ({note})" if note else ""))


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, repeatable for an ensemble, and its --weights (`load_captioner` reads them)."""
    parser.add_argument("--checkpoint", required=True, action="append", metavar="DIR",
                        help="checkpoint directory (model.safetensors + config.json); repeat it to decode an "
                             "ensemble, whose word probabilities are averaged as in the reference's eval_ensemble.py")
    parser.add_argument("--weights", type=float, nargs="+", metavar="W",
                        help="ensemble: one positive weight per --checkpoint (default: equal weights)")


def load_captioner(args: argparse.Namespace):
    """The Captioner of --checkpoint (or the ensemble of several) at --precision on --device, decoding on --threads."""
    from satic.captioner import Captioner

    use_threads(args.threads)
    if args.weights is not None:
        if len(args.checkpoint) == 1:
            raise SaticError("--weights is for an ensemble; give several --checkpoint DIR, or drop --weights")
        if len(args.weights) != len(args.checkpoint) or not all(0 < w < math.inf for w in args.weights):
            raise SaticError(f"--weights: expected {len(args.checkpoint)} positive finite numbers, one per "
                             f"--checkpoint, got {' '.join(map(str, args.weights))}")
    return Captioner.load(args.checkpoint, args.precision, args.device, weights=args.weights)  # one, or an ensemble


def add_threads_argument(parser: argparse.ArgumentParser, also: str = "") -> None:
    """--threads: the CPU threads of a command's decoding (`use_threads` sets them); `also` adds to its help."""
    parser.add_argument("--threads", type=positive_int,
                        help=f"CPU threads for decoding{also} (default: torch's, one per core)")


def use_threads(threads: int | None) -> None:
    """--threads, where given: torch's CPU threads from here on."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_decoding_arguments(parser: argparse.ArgumentParser, what: str, beam_size_help: str | None = None) -> None:
    """The decoding options `satic caption` and `satic eval` share; `what` names the images --max-images
    counts (e.g. "of the store"). With `beam_size_help`, --beam-size defaults to None and the command
    picks the width (the help says how)."""
    parser.add_argument("--beam-size", type=positive_int, default=None if beam_size_help else 1,
                        help=beam_size_help or "beam width; 1 is greedy decoding")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images decoded at once")
    parser.add_argument("--max-images", type=positive_int,
                        help=f"only the first M images {what} (default: all of them)")
    parser.add_argument("--max-length", type=positive_int, help="longest caption in words (default: the checkpoint's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="weights and arithmetic of the decoder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_threads_argument(parser, ", and for the timing of it")
    group = parser.add_argument_group("decoding options (those of the reference's eval.py; off by default, or as "
                                      "the checkpoint records them)")
    group.add_argument("--sample-method", choices=("greedy", "sample"),
                       help="greedy: the most likely words (default); sample: draw them (beam size 1)")
    group.add_argument("--temperature", type=float, help="sampling: probabilities ~ exp(log-prob / T) (default: 1)")
    group.add_argument("--top-k", type=positive_int,
                       help="sampling: draw from the K most likely words only (default: every word)")
    group.add_argument("--top-p", type=float,
                       help="sampling: draw from the smallest set of most likely words whose probability reaches P, "
                            "0 < P <= 1 (nucleus sampling; default: 1, every word)")
    group.add_argument("--seed", type=seed_number,
                       help="sampling: seed the draws, so that the same command gives the same captions (default: "
                            "unseeded, as the reference)")
    group.add_argument("--beam-groups", type=positive_int,
                       help="diverse beam search: groups of beams, the reference's --group_size (default: 1)")
    group.add_argument("--diversity-lambda", type=float,
                       help="diverse beam search: penalty per use of a word by earlier groups (default: 0.5)")
    group.add_argument("--decoding-constraint", action="store_true", default=None,
                       help="never repeat a word right after itself")
    group.add_argument("--block-trigrams", action="store_true", default=None, help="penalise a repeated trigram")
    add_recorded_decoding_arguments(group)


def add_recorded_decoding_arguments(group: argparse._ActionsContainer) -> None:
    """--length-penalty and --remove-bad-endings: the options a checkpoint may record beside its max_length (as the
    reference's infos do), which the command then decodes with; given, they override it."""
    group.add_argument("--length-penalty", metavar="wu_A|avg_A|none", type=length_penalty_flag,
                       help="rank finished beams by a length-normalised score, e.g. wu_0.9; none: by the summed "
                            "log-prob (default: the checkpoint's, else none)")
    group.add_argument("--remove-bad-endings", action=argparse.BooleanOptionalAction,
                       help="drop trailing words such as 'a', 'the' or 'with' from the caption text; "
                            "--no-remove-bad-endings keeps them (default: the checkpoint's, else kept)")


def length_penalty_flag(text: str) -> str:
    """--length-penalty: `none` is DecodeOptions' '' (beams ranked by their summed log-prob), else wu_A or avg_A."""
    from satic.decoding.options import MAX_LENGTH_ALPHA, is_length_penalty

    if text == "none":
        return ""
    if not is_length_penalty(text):
        raise argparse.ArgumentTypeError(f"expected none, wu_A or avg_A with |A| <= {MAX_LENGTH_ALPHA:g} "
                                         f"(e.g. wu_0.9), got {text!r}")
    return text


DECODING_FLAGS = ("max_length", "sample_method", "temperature", "top_k", "top_p", "length_penalty", "beam_groups",
                  "diversity_lambda", "decoding_constraint", "block_trigrams", "remove_bad_endings", "n_best",
                  "sample_n")


def decoding_choices(args: argparse.Namespace) -> dict:
    """The decoding options given on the command line, as DecodeOptions fields (the checkpoint's defaults
    fill the rest); a value or a combination DecodeOptions refuses is an error in the flags' spelling."""
    from satic.decoding import DecodeOptions

    given = {name: value for name in DECODING_FLAGS if (value := getattr(args, name, None)) is not None}
    drawn = [flag for flag, given_it in (("--top-k", "top_k" in given), ("--top-p", "top_p" in given),
                                         ("--seed", args.seed is not None)) if given_it]
    if drawn and given.get("sample_method") != "sample":
        raise ignored_options_error(drawn, "--sample-method sample", "greedy and beam search draw nothing")
    try:
        DecodeOptions(beam_size=args.beam_size, **given)
    except ValueError as err:
        message = str(err)
        for name in ("beam_size", *DECODING_FLAGS):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise SaticError(message) from None
    return given


def seed_draws(args: argparse.Namespace) -> None:
    """Seed torch's default generator, which sampling draws from, when --seed was given."""
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)


def version() -> str:
    """The installed package's version (its metadata), or the source tree's when run uninstalled."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("satic")
    except PackageNotFoundError:
        from satic import __version__

        return __version__


def usage() -> str:
    lines = ["usage: satic [--version] COMMAND [options]   (satic COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<17} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "options:", f"  {'-h, --help':<17} show this message", f"  {'--version':<17} print satic's version"]
    return "\n".join(lines)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (polling its end reports an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout), or no poll
        return False


def _bytes_or_escapes(err: UnicodeEncodeError) -> tuple[bytes, int]:
    """stdout's error handler where Python's own is surrogateescape (an ASCII locale): a file name's bytes that the
    locale could not decode (surrogates) are written back as they were read, and other text it cannot encode (the
    "é" of a caption) as backslash escapes, instead of a traceback."""
    text = err.object[err.start:err.end]
    return b"".join(bytes([ord(ch) - 0xDC00]) if 0xDC80 <= ord(ch) <= 0xDCFF else ch.encode("ascii", "backslashreplace")
                    for ch in text), err.end


codecs.register_error("satic.bytes_or_escapes", _bytes_or_escapes)


@contextlib.contextmanager
def _printable_stdout() -> Iterator[None]:
    """Text stdout cannot encode (a file name with accents under an ASCII or Latin-1 locale) is printed with
    backslash escapes, as Python prints it on stderr, instead of ending the command with a traceback."""
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    if errors not in ("strict", "surrogateescape") or not hasattr(stream, "reconfigure"):
        yield
        return
    stream.reconfigure(errors="backslashreplace" if errors == "strict" else "satic.bytes_or_escapes")
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):  # a stdout closed meanwhile
            stream.reconfigure(errors=errors)


def _open_closed_streams() -> None:
    """A standard stream closed by the caller (`satic caption >&-`) is opened on /dev/null, where what is written to
    it goes nowhere, as Python's print treats a closed one, instead of a traceback from the first library that writes
    to it (a progress bar on stderr); and no file satic opens takes its number, where a child process's output would
    land."""
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        if getattr(sys, name) is None:  # its descriptor was closed when Python started
            setattr(sys, name, open(os.devnull, "r" if number == 0 else "w"))  # the lowest free number: this one


@contextlib.contextmanager
def writing_stdout() -> Iterator[None]:
    """A block that writes to stdout alone, flushed at its end, so that a write the system refuses (stdout redirected
    to a full disk) ends the command with a message naming stdout, not a bare "No space left on device", nor lost in
    the flush at exit. What stdout still holds is then dropped, so that the exit adds no second error."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:  # a reader that stopped early: main ends quietly
        raise
    except OSError as err:
        _drop_stdout()
        hint = "; make room where it is redirected" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise SaticError(f"cannot write to standard output: {err.strerror or err}{hint}") from None


def _run(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """A command's main, with what it printed flushed before it counts as done (also after --help)."""
    try:
        code = int(main(argv) or 0)
    except SystemExit:  # argparse's --help, or a usage error
        _flush_stdout()
        raise
    _flush_stdout()
    return code


def _flush_stdout() -> None:
    with writing_stdout():
        pass


def _drop_stdout() -> None:
    """Point stdout's descriptor at /dev/null, so that what it still holds goes nowhere at exit, without a second
    error; nothing to do for a stdout with no descriptor (a captured one)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        number = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, number)
        finally:
            os.close(null)


def _reader_gone() -> int:
    """The exit status of a command whose stdout pipe's reader has gone: it ends as a pipe's writer does, silently, and
    without a second error when stdout is flushed at exit."""
    _drop_stdout()
    return 128 + signal.SIGPIPE


class _WholeImports:
    """The satic program's first entry in sys.meta_path: torch and numpy are imported with Ctrl-C and SIGTERM held
    (satic.io.deferred_interrupts) until they are whole, then the signal acts. torch's C++ start-up calls back into
    Python and clears an error raised there, a KeyboardInterrupt included: a Ctrl-C in that second or so was lost (the
    command ran on) or left numpy half loaded (an AttributeError from numpy later)."""

    NAMES = ("numpy", "torch")

    def find_spec(self, name, path=None, target=None):
        if name not in self.NAMES:
            return None
        finders = sys.meta_path[sys.meta_path.index(self) + 1:] if self in sys.meta_path else []
        spec = next((found for finder in finders if hasattr(finder, "find_spec")
                     for found in [finder.find_spec(name, path, target)] if found is not None), None)
        loader = getattr(spec, "loader", None)
        if loader is not None and hasattr(loader, "exec_module"):
            load = loader.exec_module  # this file's own loader: the wrapper serves this import only

            def exec_module(module):
                from satic.io import deferred_interrupts

                with deferred_interrupts():
                    load(module)

            loader.exec_module = exec_module
        return spec


def _check_working_folder() -> None:
    """A current folder deleted under the shell is named before torch is imported, whose math library otherwise stops
    the process with "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise SaticError("the current folder no longer exists (it was deleted); cd into an existing folder and run "
                         "the command again") from None


TQDM_NUMBERS = {"mininterval": float, "maxinterval": float, "miniters": float, "smoothing": float, "delay": float,
                "ncols": int, "nrows": int, "position": int, "unit_divisor": int}  # tqdm reads each as TQDM_<NAME>
TQDM_PER_BAR = ("iterable", "file", "total", "initial", "write_bytes", "lock_args")


def _check_tqdm_environment() -> None:
    """tqdm reads a TQDM_<ARGUMENT> variable for each of its arguments as it is imported, and a number it cannot read
    ends the process with a traceback; those satic sets for each bar itself (its stream, its count) would break the
    bars, or make their counts wrong. Each is named here, before anything imports tqdm."""
    for name, text in sorted(os.environ.items()):
        argument = name[len("TQDM_"):].lower() if name.startswith("TQDM_") else ""
        if argument in TQDM_PER_BAR:
            raise SaticError(f"environment variable {name} sets tqdm's {argument} argument for every progress bar, "
                             f"which satic sets for each bar itself; unset {name}")
        kind = TQDM_NUMBERS.get(argument)
        if kind is None:
            continue
        try:
            number = kind(text)
        except ValueError:
            number = None
        if argument == "mininterval" and not (number is not None and number >= 0):  # NaN too
            raise SaticError(f"environment variable {name}={text!r} is not a number of seconds, 0 or more; set the "
                             f"seconds between progress lines (e.g. {name}=60), or unset it")
        if number is None:
            what = "a whole number" if kind is int else "a number"
            raise SaticError(f"environment variable {name}={text!r} is not {what}, which tqdm reads it as; set "
                             f"{what} or unset {name}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is, so that every half-written output is removed on
    the way out (temporary files and folders are deleted by the code that made them)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the process's entry point (`satic`, `python -m satic`), not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    _open_closed_streams()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        try:
            with writing_stdout():
                print(f"satic {version()}" if argv[:1] == ["--version"] else usage())
        except SaticError as err:
            print(f"satic: error: {err}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # `satic --help | head -1`
            return _reader_gone()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"satic: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals reach only that one
    raised: list[int] = []  # the signals whose exception was raised; code that ran the handler may have lost it

    def stop(signum, frame) -> None:
        raised.append(signum)
        (_raise_terminated if signum == signal.SIGTERM else signal.default_int_handler)(signum, frame)
        raised.pop()  # a handler that let the signal pass

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)
                if signum == signal.SIGTERM or signal.getsignal(signum) is signal.default_int_handler
                } if in_main_thread else {}  # a SIGINT ignored or handled by the host is left as it is
    show_warning, report_unraisable = warnings.showwarning, sys.unraisablehook

    lost: list[int] = []

    def unraisable(report) -> None:  # an exception Python could not raise (in a finalizer or a weakref callback)
        if not (raised and isinstance(report.exc_value, KeyboardInterrupt)):
            report_unraisable(report)
            return
        lost.append(signal.SIGTERM if isinstance(report.exc_value, Terminated) else signal.SIGINT)
        if len(lost) == len(raised):  # none of the signals is stopping the command: this one acts again where the work
            # goes on, not once main returns; sent from another thread, which runs once this hook has returned
            _thread.start_new_thread(_thread.interrupt_main, (lost[-1],))

    sys.unraisablehook = unraisable

    def one_line(message, category, filename, lineno, file=None, line=None):  # ours: no source line of ours
        if Path(filename).resolve().is_relative_to(PACKAGE):
            from tqdm import tqdm

            tqdm.write(f"satic {name}: warning: {message}", file=sys.stderr)  # on a line of its own, under any bar
        else:  # a library's keeps its place and category
            show_warning(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    if as_program and in_main_thread and not any(isinstance(f, _WholeImports) for f in sys.meta_path):
        sys.meta_path.insert(0, _WholeImports())
    try:
        _check_working_folder()
        _check_tqdm_environment()
        module = importlib.import_module(COMMANDS[name][0])
        with _printable_stdout():
            code = _run(module.main, rest)
        if raised:  # its exception was lost on the way (raised in a finalizer, which Python only reports): act now
            raise Terminated if signal.SIGTERM in raised else KeyboardInterrupt
        return code
    except SaticError as err:
        print(f"satic {name}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError as err:  # `satic caption ... | head -1`: the reader has what it wanted
        if not _stdout_closed():  # another pipe (a child process's): an error like any other
            print(f"satic {name}: error: {err.strerror or err}", file=sys.stderr)
            return 2
        return _reader_gone()
    except OSError as err:  # the system refused a file operation no check foresaw: say which, not a traceback
        where = f": {err.filename}" if err.filename else ""
        print(f"satic {name}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"satic {name}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"satic {name}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        warnings.showwarning, sys.unraisablehook = show_warning, report_unraisable
        if as_program and in_main_thread:  # the outcome is decided: a signal during the interpreter's teardown
            for signum in (signal.SIGINT, signal.SIGTERM):  # (torch's exit handlers) ends it, not with a traceback
                signal.signal(signum, signal.SIG_DFL)
        else:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
