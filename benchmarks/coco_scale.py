"""Two steps whose cost grows with COCO's size, timed on this code and with --before DIR on the code of DIR/src (a
git worktree of another commit) in alternating subprocesses, so both see the same machine load.

  * reward: the CIDEr-D reward of an SCST batch (10 images, the paper's batch, and 50; 5 sampled captions each
    against 5 references) against a training table of COCO's size. cider_speed.py scores against the n-grams of
    6000 captions; COCO's training references (113,287 images x 5) hold millions. Here that table gets --ngrams
    4-grams of words no caption has, so the rewards stay the same and only the table's size changes.
  * beam: the Python beam search over a bare model (beam 5, the 5 best captions of each of 50
    images, 16 words), a K=1 model of random weights with COCO's 9,487 words: the paper's size (6 layers, d_model
    512, 36 regions x 2048), or --small (1 layer, d_model 16, 16-dim regions), where the search itself dominates.

ms per call, the median of --repeats after an untimed call, the best over --rounds; one CPU thread.

    python benchmarks/coco_scale.py --before /tmp/before
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BATCHES = (10, 50)
COCO_WORDS = 9487


def padded_table(extra: int):
    """The document frequencies of the benchmark's captions (as cider_speed.py), and `extra` unseen 4-grams."""
    from cider_speed import array_to_str, encode, neighbour_corpus, sorted_captions

    from satic.evaluation import DocumentFrequency
    from satic.evaluation.ngrams import pack

    captions = sorted_captions()
    vocab: dict[str, int] = {}
    train, _ = neighbour_corpus(captions, len(captions))
    small = DocumentFrequency.from_references([[array_to_str(r).split() for r in encode(refs, vocab)]
                                               for refs in train.values()])
    i = np.arange(extra)
    unseen = pack(np.stack([i // 40000, i // 200 % 200, i % 200, np.zeros_like(i)], axis=1) + 20000)  # (extra,)
    keys = np.concatenate([small.keys, unseen])
    order = np.argsort(keys, kind="stable")
    counts = np.concatenate([small.counts, np.ones(extra, np.int64)])
    table = DocumentFrequency(small.words, keys[order], counts[order], small.num_ref_sets)
    return table, captions, vocab


def measure_rewards(extra: int, repeats: int) -> dict:
    from cider_speed import encode, median_seconds, neighbour_corpus

    from satic.evaluation import CiderD

    table, captions, vocab = padded_table(extra)
    scorer = CiderD(table)
    rng = np.random.default_rng(0)
    out = {}
    for batch in BATCHES:
        gts, res = neighbour_corpus(captions, batch, stride=97)
        references = [encode(gts[k], vocab) for k in gts]
        samples = np.repeat(np.stack([encode(res[k], vocab)[0] for k in gts]), 5, axis=0)  # (batch * 5, 16)
        swap = (rng.random(samples.shape) < 0.3) & (samples != 0)
        samples[swap] = rng.integers(1, len(vocab) + 1, size=int(swap.sum()))
        scorer.score_token_ids(samples, references)  # untimed
        out[f"reward, {batch} images x 5 samples, {len(table):,} n-grams"] = median_seconds(
            lambda: scorer.score_token_ids(samples, references), repeats) * 1e3
    return out


def measure_beam(small: bool, repeats: int) -> dict:
    import torch
    from cider_speed import median_seconds

    from satic.decoding import DecodeOptions, decode
    from satic.model.config import ModelConfig
    from satic.model.transformer import SATModel

    torch.manual_seed(0)
    size = dict(num_layers=1, d_model=16, d_ff=32, num_heads=2, att_feat_size=16) if small else {}
    model = SATModel(ModelConfig(vocab_size=COCO_WORDS, **size)).eval()
    feats = torch.randn(50, 36, model.config.att_feat_size)  # (B, N, D)
    options = DecodeOptions(beam_size=5, max_length=16, n_best=5)
    with torch.no_grad():
        decode(model, feats[:5], None, options)  # untimed
        ms = median_seconds(lambda: decode(model, feats, None, options), repeats) * 1e3
    return {f"Python beam search, beam 5 x 50 images, {'small' if small else 'paper-size'} model": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a worktree of the code to compare with")
    parser.add_argument("--ngrams", type=int, default=10_000_000, help="unseen 4-grams added to the reward's table")
    parser.add_argument("--small", action="store_true", help="beam search with a 1-layer d_model 16 model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of subprocesses")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)
        measured = measure_rewards(args.ngrams, 4 * args.repeats)
        print(json.dumps({**measured, **measure_beam(args.small, args.repeats)}))
        return
    if args.before and not (args.before / "src" / "satic").is_dir():  # else the worker imports this code
        parser.error(f"--before {args.before}: no src/satic there (give a git worktree of another commit)")
    here = Path(__file__).resolve().parent.parent / "src"
    versions = {"now": here, **({"before": args.before.resolve() / "src"} if args.before else {})}
    best: dict = {}
    for _ in range(args.rounds):
        for name, src in versions.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            result = subprocess.run([sys.executable, __file__, "--worker", "--ngrams", str(args.ngrams), "--repeats",
                                     str(args.repeats), *(["--small"] if args.small else [])],
                                    env=env, capture_output=True, text=True)
            if result.returncode:  # the worker's own error, not only its exit status
                raise SystemExit(f"the {name} worker failed:\n{result.stderr}")
            for key, ms in json.loads(result.stdout.strip().splitlines()[-1]).items():
                best[(key, name)] = min(best.get((key, name), float("inf")), ms)
    from satic.evaluation.report import text_table  # here, not at the top: a worker imports only its version's code

    header = ["workload", *(f"{n} ms" for n in versions), *(["before / now"] if args.before else [])]
    rows = []
    for key in dict.fromkeys(k for k, _ in best):
        ms = {n: best[(key, n)] for n in versions}
        ratio = [f"{ms['before'] / ms['now']:.1f}x"] if args.before else []
        rows.append([key, *(f"{v:.{2 if v < 10 else 1}f}" for v in ms.values()), *ratio])
    print(text_table(header, rows, markdown=True))


if __name__ == "__main__":
    main()
