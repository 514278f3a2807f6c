"""`satic` and `python -m satic`. Ctrl-C while the command's modules are still loading, before satic.cli.main
catches it, ends the command as main does, with one line and exit status 130, not an import traceback. Nothing is
imported here before that (even the signal module takes a noticeable share of the start)."""
import sys


def run() -> int:
    try:
        from satic.cli import main
    except KeyboardInterrupt:
        print("satic: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, main's status for Ctrl-C
    return main()


if __name__ == "__main__":
    sys.exit(run())
