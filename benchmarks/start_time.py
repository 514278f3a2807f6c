"""How long a fresh process takes from start to its first caption, the cost every `satic caption`, `eval` and
`serve` pays before any work, and to its exit.

The checkpoint: the paper's model (6 layers, d_model 512, d_ff 2048, COCO's 9,487 words, K=2) of random weights,
written to a temporary folder. Each timed run is a new process; the time is its wall time as this script sees it.
Five kinds of process, interleaved in this one run:
  * import torch: the floor, torch's own import (and the interpreter's teardown after it);
  * satic: a `python -c` process that imports satic, loads the checkpoint with Captioner.load and captions one
    image of 36 regions;
  * satic, torch._dynamo imported first: what the same process cost before 43ed640, whose layout check on the
    meta device made torch import torch._dynamo;
  * satic caption: the command (`satic caption --checkpoint CKPT --features STORE`, through satic.__main__.run)
    on a store of that one image;
  * satic caption, teardown collections kept: the same command with satic.__main__._spare_the_teardown a no-op,
    so that the interpreter's teardown walks torch's heap in its collections, as every satic command did
    before.
Usage: python benchmarks/start_time.py [--passes N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from satic.data.stores import create_store
from satic.data.vocab import Vocabulary
from satic.evaluation.report import text_table
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import save_checkpoint

PAPER = ModelConfig(vocab_size=9487, group_size=2)
CAPTION = ("import sys, torch; from satic.captioner import Captioner; "
           "Captioner.load(sys.argv[1]).caption(torch.ones(1, 36, 2048))")
COMMAND = ("import sys, satic.__main__ as entry; {}"
           "sys.argv[1:] = ['caption', '--checkpoint', sys.argv[1], '--features', sys.argv[2]]; sys.exit(entry.run())")
KINDS = {"import torch": "import torch", "satic": CAPTION,
         "satic, torch._dynamo imported first": "import torch._dynamo; " + CAPTION,
         "satic caption": COMMAND.format(""),
         "satic caption, teardown collections kept": COMMAND.format("entry._spare_the_teardown = lambda: None; ")}
BEFORE = {"satic": "satic, torch._dynamo imported first", "satic caption": "satic caption, teardown collections kept"}


def seconds(script: str, checkpoint: Path, store: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script, str(checkpoint), str(store)], env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5, help="timed processes of each kind (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        checkpoint = save_checkpoint(Path(folder) / "paper-k2", SATModel(PAPER),
                                     Vocabulary([f"w{i}" for i in range(PAPER.vocab_size)]))
        store = Path(folder) / "one_att"
        with create_store(store, "npz") as writer:
            writer.add("1", np.ones((36, 2048), np.float32))
        for script in KINDS.values():  # untimed: the files in the page cache, the kernel built
            seconds(script, checkpoint, store)
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(args.passes):
            for kind, script in KINDS.items():
                times[kind].append(seconds(script, checkpoint, store))
    medians = {kind: statistics.median(values) for kind, values in times.items()}

    def versus_before(kind: str) -> str:
        if kind in BEFORE:
            return f"{medians[BEFORE[kind]] / medians[kind]:.2f}x"
        return "1.00x" if kind in BEFORE.values() else ""

    rows = [[kind, f"{value:.2f}", versus_before(kind)] for kind, value in medians.items()]
    print(f"median of {args.passes} fresh processes each, interleaved; seconds from start to exit")
    print(text_table(["process", "s", "vs. before"], rows))


if __name__ == "__main__":
    main()
