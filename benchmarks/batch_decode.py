"""Greedy captioning of a batch on the CPU with the compiled decoder (`satic.Captioner`: the native prefill,
step and loop), for batch sizes and thread counts, and with --before DIR the same on the code of DIR/src
(a git worktree of another commit) in alternating subprocesses, so both see the same machine load. With
--members 1,2 also ensembles of 2 models (their probabilities mixed at every step, as `satic eval` with
several --checkpoint). --search picks decoding settings (greedy, beam search, sampling, decoding constraints).

Random weights (each member its own seed), K=2 (or --k); the paper size (6 layers, d_model 512, 36 regions x 2048) and
the demo size (2 layers, d_model 128, 22 regions x 128); ms per batch, the best of --passes after an untimed
call.

    python benchmarks/batch_decode.py --before /tmp/before          # batch 1, 8, 32 (paper), 1, 16, 50 (demo)
    python benchmarks/batch_decode.py --before /tmp/before --members 1,2 --threads 1
    python benchmarks/batch_decode.py --before /tmp/before --threads 1 --batch 1 \
        --search greedy,greedy+constraint,greedy+trigrams,beam3,beam3+constraint,beam3+trigrams
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# + "+constraint" / "+trigrams" (see search_options); "diverse": 6 beams in 3 groups (diversity_lambda 0.5)
# "sample": words drawn (sample_method sample); "sample4": 4 drawn captions per image
SEARCHES = {"greedy": {}, "beam3": dict(beam_size=3), "diverse": dict(beam_size=6, beam_groups=3),
            "sample": dict(sample_method="sample"), "sample4": dict(sample_method="sample", sample_n=4)}
# size: (regions, feature size, batch sizes); the models: ModelConfig's defaults (the paper's size) with COCO's
# words, and configs/demo's model with 100 words
SIZES = {"paper": (36, 2048, (1, 8, 32)), "demo": (22, 128, (1, 16, 50))}
COCO_WORDS = 9487


def search_options(name: str) -> dict:
    """'beam3+constraint+trigrams' -> Captioner.options keywords."""
    base, *extras = name.split("+")
    flags = {"constraint": "decoding_constraint", "trigrams": "block_trigrams"}
    if base not in SEARCHES or any(e not in flags for e in extras):
        raise SystemExit(f"--search {name}: expected one of {list(SEARCHES)}, each with optional "
                         f"{['+' + e for e in flags]}")
    return {**SEARCHES[base], **{flags[e]: True for e in extras}}


def measure(threads: int, passes: int, members: list[int], searches: list[str], batches: list[int] | None,
            group_size: int) -> dict:
    """{"size/members/search/batch": ms} on the code this process imports."""
    import tempfile

    import torch

    from satic.captioner import Captioner
    from satic.config import configs_dir, load_config
    from satic.data.vocab import Vocabulary
    from satic.evaluation.timing import time_call
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import save_checkpoint
    from satic.training.config import TrainConfig, check_model_section

    demo = load_config(TrainConfig, configs_dir() / "demo" / "teacher_xe.yaml").model
    configs = {"paper": ModelConfig(vocab_size=COCO_WORDS, group_size=group_size),
               "demo": check_model_section({**demo, "group_size": group_size}, vocab_size=100, att_feat_size=128)}
    torch.set_num_threads(threads)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for size, (regions, dim, size_batches) in SIZES.items():
            config = configs[size]
            words = Vocabulary(tuple(f"w{i}" for i in range(1, config.vocab_size + 1)))
            saved = []
            for seed in range(max(members)):
                torch.manual_seed(seed)
                model = SATModel(config).eval()
                saved.append(save_checkpoint(Path(folder) / f"{size}-{seed}", model, words))
            for count in members:
                captioner = Captioner.load(saved[0] if count == 1 else saved[:count])
                for search in searches:
                    options = captioner.options(**search_options(search))
                    for batch in batches or size_batches:
                        feats = torch.randn(batch, regions, dim, generator=torch.Generator().manual_seed(batch))
                        timing = time_call(lambda: captioner.decode(feats, None, options), passes=passes, warm_up=1)
                        out[f"{size}/{count}/{search}/{batch}"] = timing.value * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a worktree of the code to compare with")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of subprocesses")
    parser.add_argument("--members", default="1", help="models per captioner (2 or more: an ensemble), comma-separated")
    parser.add_argument("--search", default="greedy", help="decoding settings, comma-separated: greedy, beam3, "
                        "diverse (6 beams in 3 groups), sample (drawn words) or sample4 (4 drawn captions per image), "
                        "each with optional +constraint (decoding_constraint) and +trigrams (block_trigrams)")
    parser.add_argument("--k", type=int, default=2, help="group size K of the models (default: 2)")
    parser.add_argument("--batch", help="batch sizes, comma-separated (default: 1, 8, 32 paper; 1, 16, 50 demo)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.before and not (args.before / "src" / "satic").is_dir():  # else the worker imports this code
        parser.error(f"--before {args.before}: no src/satic there (give a git worktree of another commit)")
    searches = args.search.split(",")
    for search in searches:
        search_options(search)  # a bad name stops here, not in every worker
    if args.worker is not None:
        batches = [int(b) for b in args.batch.split(",")] if args.batch else None
        print(json.dumps(measure(args.worker, args.passes, [int(m) for m in args.members.split(",")], searches,
                                 batches, args.k)))
        return
    here = Path(__file__).resolve().parent.parent / "src"
    versions = {"now": here, **({"before": args.before.resolve() / "src"} if args.before else {})}
    best: dict = {}
    for _ in range(args.rounds):
        for threads in map(int, args.threads.split(",")):
            for name, src in versions.items():
                env = {**os.environ, "PYTHONPATH": str(src)}
                result = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--passes",
                                         str(args.passes), "--members", args.members, "--search", args.search,
                                         "--k", str(args.k), *(["--batch", args.batch] if args.batch else [])],
                                        env=env, capture_output=True, text=True)
                if result.returncode:  # the worker's own error, not only its exit status
                    raise SystemExit(f"the {name} worker ({threads} threads) failed:\n{result.stderr}")
                for key, ms in json.loads(result.stdout.strip().splitlines()[-1]).items():
                    slot = (key, threads, name)
                    best[slot] = min(best.get(slot, float("inf")), ms)
    from satic.evaluation.report import text_table  # here, not at the top: a worker imports only its version's code

    header = ["size", "models", "search", "batch", "threads", *(f"{n} ms" for n in versions),
              *(["before / now"] if args.before else [])]
    rows = []
    for key in dict.fromkeys(k for k, _, _ in best):
        size, count, search, batch = key.split("/")
        for threads in map(int, args.threads.split(",")):
            ms = {n: best[(key, threads, n)] for n in versions}
            cells = [f"{v:.{2 if v < 10 else 1}f}" for v in ms.values()]
            ratio = [f"{ms['before'] / ms['now']:.2f}x"] if args.before else []
            rows.append([size, count, search, batch, str(threads), *cells, *ratio])
    print(text_table(header, rows, "lrlrr" + "r" * (len(header) - 5), markdown=True))


if __name__ == "__main__":
    main()
