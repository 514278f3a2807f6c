"""How long loading a checkpoint of the paper's size takes, against the way satic loaded one before.

The checkpoint: the paper's model (6 layers, d_model 512, d_ff 2048, COCO's 9,487 words, K=2) of random weights,
written to a temporary folder. Three loaders, timed interleaved in this one run:
  * initialise, then copy: SATModel(config) draws every weight, safetensors' load_model copies the file's tensors
    over them, and torch.isfinite checks each (how satic loaded checkpoints before);
  * load_checkpoint: the file's SHA-256 checked against config.json, the layout checked on a model without
    storage, the file's tensors copied in as the model's own, and one pass over each for NaN and infinity;
  * load_checkpoint of the same files as a version 1 checkpoint (saved before the digest): all of that but the
    SHA-256, which this row's difference from the one before prices.
All give the same weights; the script checks that before timing.
Usage: python benchmarks/load_time.py [--passes N] [--threads T]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model

from satic.data.vocab import Vocabulary
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_calls, torch_threads
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint

PAPER = ModelConfig(vocab_size=9487, group_size=2)


def initialise_then_copy(directory: Path) -> SATModel:
    model = SATModel(PAPER)
    load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())
    return model.eval()


def as_version_1(directory: Path, target: Path) -> Path:
    """A copy of the checkpoint as satic saved them before config.json held the weights' SHA-256."""
    shutil.copytree(directory, target)
    document = json.loads((target / CONFIG_FILE).read_text())
    del document["weights_sha256"]
    (target / CONFIG_FILE).write_text(json.dumps({**document, "format_version": 1}))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5, help="timed passes of each loader (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, torch_threads(args.threads):
        torch.manual_seed(0)
        directory = save_checkpoint(Path(folder) / "paper-k2", SATModel(PAPER),
                                    Vocabulary([f"w{i}" for i in range(PAPER.vocab_size)]))
        unchecked = as_version_1(directory, Path(folder) / "paper-k2-version-1")
        ours, before = load_checkpoint(directory).model.state_dict(), initialise_then_copy(directory).state_dict()
        old = load_checkpoint(unchecked).model.state_dict()
        assert ours.keys() == before.keys() == old.keys()
        assert all(torch.equal(ours[name], before[name]) and torch.equal(ours[name], old[name]) for name in ours)
        timings = time_calls({"initialise, then copy": lambda: initialise_then_copy(directory),
                              "load_checkpoint": lambda: load_checkpoint(directory),
                              "load_checkpoint, version 1": lambda: load_checkpoint(unchecked)},
                             passes=args.passes, statistic="median")
    baseline = timings["initialise, then copy"].value
    rows = [[name, f"{timing.value:.2f}", f"{baseline / timing.value:.2f}x"] for name, timing in timings.items()]
    size = sum(t.numel() for t in ours.values())
    print(f"paper-size checkpoint ({size / 1e6:.1f}M weights), {timings['load_checkpoint'].describe()}")
    print(text_table(["loader", "s per load", "speed-up"], rows, markdown=True))


if __name__ == "__main__":
    main()
