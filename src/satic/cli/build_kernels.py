"""satic build-kernels: build the CPU decoding kernel now, instead of at the first decode.

The kernel library (src/satic/csrc: the small-row linear layers and norms in small_gemm.cpp, the native
prefill in encoder.cpp, the native step and search loops in decoder.cpp) is built once with torch's C++
extension loader into a folder named by a hash of its sources, build flags and torch and Python versions, and loaded
from there by every later process."""
from __future__ import annotations

import argparse

from satic.cli import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="satic build-kernels", description=__doc__, formatter_class=HelpFormatter)


def main(argv: list[str]) -> int:
    build_parser().parse_args(argv)
    from satic.decoding.small_gemm import build_kernel

    folder, seconds = build_kernel()  # SaticError with the reason when it cannot be built here
    print(f"small-row kernel ready in {folder} ({seconds:.1f} s)")
    return 0
