"""How much faster our CIDEr scorers are than the per-pair scorers they replace, on real captions.

Captions: generated COCO val2014 captions of the reference model (benchmarks/data, 6000 of
them). An image's references are its neighbours in sorted order, so they overlap as human
references do. Two workloads, each timed in this one run (median of repeats):
  * an SCST reward batch: 50 images x 5 sampled token sequences vs 5 references, document
    frequencies from a training corpus. Baseline: the reference's path (array_to_str, then the
    coco-caption CiderScorer with that df, the algorithm of ruotianluo/cider's CiderD).
    Ours: CiderD.score_token_ids.
  * corpus CIDEr on 5000 images: pycocoevalcap's Cider vs our Cider.
Usage: python benchmarks/cider_speed.py [--repeats N]
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocoevalcap.cider.cider import Cider as ToolkitCider

from satic.evaluation import Cider, CiderD, DocumentFrequency
from satic.evaluation.report import text_table
from satic.evaluation.timing import time_call

SAMPLE = Path(__file__).resolve().parent / "data" / "val2014_generated_captions.tsv"


def sorted_captions() -> list[str]:
    lines = [line.split("\t", 1)[1] for line in SAMPLE.read_text().splitlines() if not line.startswith("#")]
    return sorted(lines)


def neighbour_corpus(captions: list[str], num_images: int, stride: int = 1) -> tuple[dict, dict]:
    """Image k: candidate = caption i, references = the 5 captions around it in sorted order."""
    gts, res = {}, {}
    for k in range(num_images):
        i = (stride * k) % len(captions)
        res[k] = [captions[i]]
        gts[k] = [captions[(i + d) % len(captions)] for d in (-2, -1, 1, 2, 3)]
    return gts, res


def encode(captions: list[str], vocab: dict[str, int], width: int = 16) -> np.ndarray:
    rows = np.zeros((len(captions), width), dtype=np.int64)
    for r, caption in enumerate(captions):
        ids = [vocab.setdefault(w, len(vocab) + 1) for w in caption.split()][:width]
        rows[r, : len(ids)] = ids
    return rows


def array_to_str(row: np.ndarray) -> str:
    """The reference's rule: words up to and including the first 0."""
    out = []
    for t in row:
        out.append(str(int(t)))
        if t == 0:
            break
    return " ".join(out)


def ngram_counts(caption: str) -> dict:
    words = caption.split()
    counts: dict = defaultdict(int)
    for n in range(1, 5):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def tfidf_vector(counts: dict, df: dict, ref_len: float) -> tuple[list, list, int]:
    vec: list = [defaultdict(float) for _ in range(4)]
    norm = [0.0] * 4
    length = 0
    for ngram, tf in counts.items():
        n = len(ngram) - 1
        vec[n][ngram] = float(tf) * (ref_len - np.log(max(1.0, df[ngram])))
        norm[n] += vec[n][ngram] ** 2
        if n == 1:
            length += tf
    return vec, [np.sqrt(x) for x in norm], length


def pair_similarity(hyp: tuple, ref: tuple, sigma: float = 6.0) -> np.ndarray:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    val = np.array([0.0] * 4)
    for n in range(4):
        for ngram in vh[n]:
            val[n] += min(vh[n][ngram], vr[n][ngram]) * vr[n][ngram]
        if nh[n] != 0 and nr[n] != 0:
            val[n] /= nh[n] * nr[n]
        val[n] *= np.e ** (-((lh - lr) ** 2) / (2 * sigma**2))
    return val


def reference_rewards(candidates: np.ndarray, references: list[np.ndarray], df: dict, ref_len: float) -> np.ndarray:
    """The reference's reward path, per pair as ruotianluo/cider's CiderD computes it: index strings
    (array_to_str), n-gram counts per caption, tf-idf with the training df, then one similarity per
    (candidate, reference) with the reference vectors rebuilt for every candidate."""
    per_image = len(candidates) // len(references)
    scores = []
    for m, row in enumerate(candidates):
        refs = [array_to_str(r) for r in references[m // per_image]]
        hyp = tfidf_vector(ngram_counts(array_to_str(row)), df, ref_len)
        total = np.array([0.0] * 4)
        for ref in refs:
            total += pair_similarity(hyp, tfidf_vector(ngram_counts(ref), df, ref_len))
        scores.append(np.mean(total) / len(refs) * 10.0)
    return np.array(scores)


def median_seconds(fn, repeats: int) -> float:
    return time_call(fn, passes=repeats, statistic="median").value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    captions = sorted_captions()

    # Reward batch: df from all captions as a "training corpus" of index strings, as prepro makes it.
    vocab: dict[str, int] = {}
    train_gts, _ = neighbour_corpus(captions, len(captions))
    train_rows = [encode(refs, vocab) for refs in train_gts.values()]
    df = DocumentFrequency.from_references([[array_to_str(r).split() for r in rows] for rows in train_rows])
    df_dict = defaultdict(float, {g: float(c) for g, c in df.items()})
    gts, res = neighbour_corpus(captions, 50, stride=97)
    references = [encode(gts[k], vocab) for k in gts]
    rng = np.random.default_rng(0)
    samples = []
    for k in gts:  # the candidate and 4 variants with some words replaced, like sampled captions
        base = encode(res[k], vocab)[0]
        for s in range(5):
            row = base.copy()
            swap = (rng.random(16) < 0.2 * s) & (row != 0)
            row[swap] = rng.integers(1, len(vocab) + 1, size=int(swap.sum()))
            samples.append(row)
    candidates = np.stack(samples)  # (250, 16)
    scorer = CiderD(df)
    ours = scorer.score_token_ids(candidates, references)
    theirs = reference_rewards(candidates, references, df_dict, math.log(df.num_ref_sets))
    reward_diff = float(np.abs(ours - theirs).max())
    t_ref_reward = median_seconds(lambda: reference_rewards(candidates, references, df_dict,
                                                            math.log(df.num_ref_sets)), args.repeats)
    t_our_reward = median_seconds(lambda: scorer.score_token_ids(candidates, references), args.repeats)

    # Corpus CIDEr on 5000 images.
    gts5k, res5k = neighbour_corpus(captions, 5000)
    ours5k = Cider().compute_score(gts5k, res5k)[1]
    theirs5k = ToolkitCider().compute_score(gts5k, res5k)[1]
    corpus_diff = float(np.abs(ours5k - theirs5k).max())
    corpus_repeats = max(1, args.repeats // 2)
    t_toolkit = median_seconds(lambda: ToolkitCider().compute_score(gts5k, res5k), corpus_repeats)
    t_ours = median_seconds(lambda: Cider().compute_score(gts5k, res5k), corpus_repeats)

    rows = []
    for name, theirs_s, ours_s, diff in (
            ("CIDEr-D reward, 50 img x 5 samples vs 5 refs", t_ref_reward, t_our_reward, reward_diff),
            ("CIDEr corpus, 5000 images (vs pycocoevalcap)", t_toolkit, t_ours, corpus_diff)):
        rows.append([name, f"{theirs_s * 1e3:.2f}", f"{ours_s * 1e3:.2f}", f"{theirs_s / ours_s:.1f}x", f"{diff:.1e}"])
    print(text_table(["workload", "baseline ms", "ours ms", "speed-up", "max |diff|"], rows))


if __name__ == "__main__":
    main()
