"""`satic` and `python -m satic`. Ctrl-C or SIGTERM while the command's modules are still loading, before
satic.cli.main catches them, ends the command as main does, with one line and exit status 130 or 143, not an import
traceback nor a silent death. Nothing is imported here before that (even the signal module takes a noticeable share
of the start; _signal is the interpreter's own, already loaded)."""
import sys


class _Terminated(KeyboardInterrupt):
    """SIGTERM while satic.cli loads, until main sets its own handler."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _spare_the_teardown() -> None:
    """Collect the garbage the command left now, as the interpreter's teardown would, then exempt every live
    object from the teardown's own collections, which with torch loaded walk its whole heap several times (a bare
    `import torch` process exits in about 0.2 s instead of 0.4-0.6 s on a 2-core VM; benchmarks/start_time.py
    times a whole command). Objects are still freed by their reference counts; only cycles that the teardown
    itself leaves are not collected before the process ends."""
    import gc

    gc.collect()
    gc.freeze()


def run() -> int:
    import _signal

    _signal.signal(_signal.SIGTERM, _raise_terminated)
    try:
        from satic.cli import main

        code = main()  # which catches them itself from its first lines on
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)  # the outcome is decided (also where main sets none)
        _spare_the_teardown()
        return code
    except KeyboardInterrupt as stop:
        cli = sys.modules.get("satic.cli")  # its Terminated, should one escape main's first or last lines
        if isinstance(stop, (_Terminated, getattr(cli, "Terminated", _Terminated))):
            print("satic: terminated", file=sys.stderr)
            return 143  # 128 + SIGTERM, main's status for SIGTERM
        print("satic: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, main's status for Ctrl-C


if __name__ == "__main__":
    sys.exit(run())
