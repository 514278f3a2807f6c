"""CIDEr and CIDEr-D as array maths: the same numbers as the coco-caption scorers, far faster.

Both compute, per candidate c and each of its references r, for every n-gram order n = 1..4:
    min(v_c, v_r) . v_r / (|v_c| |v_r|) * exp(-(len_c - len_r)^2 / (2 sigma^2))
where v are tf-idf vectors, idf(g) = ref_len - log(max(1, df(g))) and len counts bigrams (as the
toolkit does); the score is 10 * the mean over n of the mean over references.

`Cider` takes df from the references being scored (the coco-caption toolkit's CIDEr);
`CiderD` takes it from a `DocumentFrequency` (training references), as SCST rewards do.
Captions become rows of word ids, n-grams packed integers (see `ngrams`), and every sum a bincount
over sorted keys: no Python loop runs per caption pair.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from satic.errors import SaticError
from satic.evaluation import ngrams
from satic.evaluation.document_frequency import DocumentFrequency


@dataclass(frozen=True)
class CaptionRows:
    """Captions of one scoring call as word-id rows, and which reference set each belongs to."""

    hyp_ids: np.ndarray  # (Nh,) int64 word ids of all candidates back to back
    hyp_lengths: np.ndarray  # (H,) summing to Nh
    hyp_set: np.ndarray  # (H,) reference set of each candidate
    ref_ids: np.ndarray  # (Nr,) int64 word ids of all references back to back
    ref_lengths: np.ndarray  # (R,) summing to Nr
    ref_set: np.ndarray  # (R,) reference set of each reference caption, non-decreasing
    ref_slot: np.ndarray  # (R,) position of the caption within its set
    num_sets: int

    def __post_init__(self) -> None:
        if np.any(np.diff(self.ref_set) < 0):
            raise ValueError("reference captions must be grouped by set, in set order")


@dataclass(frozen=True)
class TfIdf:
    """Sparse tf-idf vectors of all captions of a call: one entry per (caption, n-gram)."""

    row: np.ndarray  # (E,) caption (hyps first, then refs)
    ngram: np.ndarray  # (E,) n-gram id, dense within the call; entries sorted by (ngram, row)
    order: np.ndarray  # (E,) n-gram order - 1
    value: np.ndarray  # (E,) tf * idf
    norm: np.ndarray  # (S, n) Euclidean norm per caption and order
    key: np.ndarray  # (D,) packed key of each dense n-gram id


def find_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each key in `sorted_keys`, or len(sorted_keys) where it is absent."""
    pos = np.searchsorted(sorted_keys, keys)
    hit = pos < len(sorted_keys)
    hit[hit] = sorted_keys[pos[hit]] == keys[hit]
    return np.where(hit, pos, len(sorted_keys))


def term_frequencies(rows: CaptionRows, max_order: int) -> tuple[np.ndarray, ...]:
    """-> row (E,), ngram (E,) dense ids, order (E,), tf (E,), keys (D,) of the distinct n-grams.

    One stable sort by key orders the occurrences by (n-gram, caption): occurrences come out of
    `ngram_occurrences` in caption order within each key.
    """
    ids = np.concatenate([rows.hyp_ids, rows.ref_ids])  # (N,)
    lengths = np.concatenate([rows.hyp_lengths, rows.ref_lengths])  # (S,)
    row, key = ngrams.ngram_occurrences(ids, lengths, max_order)
    by_key = np.argsort(key, kind="stable")
    key, row = key[by_key], row[by_key]  # (E_occ,)
    new_key = ngrams.starts_of_runs(key)
    dense = np.cumsum(new_key) - 1  # (E_occ,)
    starts = np.flatnonzero(ngrams.starts_of_runs(key, row))  # first occurrence of each (n-gram, caption)
    tf = np.diff(np.append(starts, len(key))).astype(np.float64)
    keys = key[new_key]
    ngram = dense[starts]
    return row[starts], ngram, ngrams.key_order(keys)[ngram] - 1, tf, keys


def corpus_document_frequency(rows: CaptionRows, row: np.ndarray, ngram: np.ndarray, num: int) -> np.ndarray:
    """(D,) number of reference sets whose references contain each n-gram (hyps do not count)."""
    num_hyps = len(rows.hyp_lengths)
    is_ref = row >= num_hyps
    sets, ref_ngram = rows.ref_set[row[is_ref] - num_hyps], ngram[is_ref]  # sorted by (ngram, set)
    first = ngrams.starts_of_runs(ref_ngram, sets)
    return np.bincount(ref_ngram[first], minlength=num).astype(np.float64)


def tf_idf(rows: CaptionRows, df: DocumentFrequency | None, max_order: int) -> TfIdf:
    """df None: corpus mode (df and ref_len from the references of this call)."""
    row, ngram, order, tf, keys = term_frequencies(rows, max_order)
    if df is None:
        counts = corpus_document_frequency(rows, row, ngram, len(keys))
        ref_len = math.log(float(rows.num_sets))
    else:
        found = find_sorted(df.keys, keys)  # (D,) len(df.keys) where unseen
        seen = found < len(df.keys)
        counts = np.zeros(len(keys))  # (D,) only the call's n-grams: the table is not copied (millions at COCO's size)
        counts[seen] = df.counts[found[seen]]
        ref_len = df.ref_len
    idf = ref_len - np.log(np.maximum(1.0, counts))  # (D,)
    value = tf * idf[ngram]  # (E,)
    num_rows = len(rows.hyp_lengths) + len(rows.ref_lengths)
    norm_sq = np.bincount(row * max_order + order, value * value, minlength=num_rows * max_order)
    return TfIdf(row, ngram, order, value, np.sqrt(norm_sq).reshape(num_rows, max_order), keys)


def cider_scores(rows: CaptionRows, df: DocumentFrequency | None, max_order: int = 4, sigma: float = 6.0) -> np.ndarray:
    """(H,) CIDEr(-D) of every candidate against its reference set."""
    vec = tf_idf(rows, df, max_order)
    num_hyps, num_refs = len(rows.hyp_lengths), len(rows.ref_lengths)
    slots = int(rows.ref_slot.max()) + 1 if num_refs else 1

    # Reference values looked up by (n-gram, set): one table row per distinct pair, one column per
    # slot. Entries are sorted by (n-gram, row) and rows by set, so these keys are already sorted.
    is_ref = vec.row >= num_hyps
    r = vec.row[is_ref] - num_hyps
    pair_keys = vec.ngram[is_ref] * rows.num_sets + rows.ref_set[r]  # (Er,) non-decreasing
    new_pair = ngrams.starts_of_runs(pair_keys)
    ref_keys = pair_keys[new_pair]  # (U,)
    table = np.zeros((len(ref_keys) + 1, slots))  # (U+1, slots); the last row stands for "absent"
    table[np.cumsum(new_pair) - 1, rows.ref_slot[r]] = vec.value[is_ref]

    # Candidate entries meet the reference values of the same n-gram in their own set.
    h = vec.row[~is_ref]
    hyp_keys = vec.ngram[~is_ref] * rows.num_sets + rows.hyp_set[h]
    ref_values = table[find_sorted(ref_keys, hyp_keys)]  # (Eh, slots)
    clipped = np.minimum(vec.value[~is_ref][:, None], ref_values) * ref_values  # (Eh, slots)
    cell = (h * max_order + vec.order[~is_ref])[:, None] * slots + np.arange(slots)  # (Eh, slots)
    overlap = np.bincount(cell.ravel(), clipped.ravel(), minlength=num_hyps * max_order * slots)
    overlap = overlap.reshape(num_hyps, max_order, slots).astype(np.float64)  # (H, n, slots); int if empty

    # Per-set reference norms and bigram lengths by slot.
    ref_norm = np.zeros((rows.num_sets, slots, max_order))
    ref_norm[rows.ref_set, rows.ref_slot] = vec.norm[num_hyps:]
    ref_len = np.zeros((rows.num_sets, slots))
    ref_len[rows.ref_set, rows.ref_slot] = np.maximum(rows.ref_lengths - 1, 0)
    present = np.zeros((rows.num_sets, slots), dtype=bool)
    present[rows.ref_set, rows.ref_slot] = True
    set_size = np.bincount(rows.ref_set, minlength=rows.num_sets)  # (G,)

    g = rows.hyp_set
    denom = vec.norm[:num_hyps, :, None] * ref_norm[g].transpose(0, 2, 1)  # (H, n, slots)
    cosine = np.divide(overlap, denom, out=overlap.copy(), where=denom != 0)
    delta = np.maximum(rows.hyp_lengths - 1, 0)[:, None] - ref_len[g]  # (H, slots)
    penalty = np.exp(-(delta**2) / (2 * sigma**2)) * present[g]  # (H, slots)
    per_order = (cosine * penalty[:, None, :]).sum(axis=2)  # (H, n)
    return per_order.mean(axis=1) / np.maximum(set_size[g], 1) * 10.0


def check_captions(gts: Mapping, res: Mapping) -> tuple[list, list[str], list[list[str]]]:
    """Check the toolkit's input contract; -> image ids (gts order), candidates, reference lists."""
    if set(gts) != set(res):
        missing, extra = sorted(map(str, set(gts) - set(res))), sorted(map(str, set(res) - set(gts)))
        raise SaticError(f"results and references cover different images "
                         f"(no result for {missing[:5]}, no references for {extra[:5]})")
    image_ids = list(gts)
    hyps, refs = [res[i] for i in image_ids], [gts[i] for i in image_ids]
    if not all(map(_is_caption_list, hyps, itertools.repeat(True))):
        i = next(i for i, h in zip(image_ids, hyps) if not _is_caption_list(h, True))
        raise SaticError(f"image {i!r}: expected exactly one candidate caption string, got {res[i]!r}")
    if not all(map(_is_caption_list, refs, itertools.repeat(False))):
        i = next(i for i, r in zip(image_ids, refs) if not _is_caption_list(r, False))
        raise SaticError(f"image {i!r}: expected a non-empty list of reference strings, got {gts[i]!r}")
    return image_ids, [h[0] for h in hyps], refs


def _is_caption_list(captions, single: bool) -> bool:
    return (isinstance(captions, (list, tuple)) and (len(captions) == 1 if single else len(captions) > 0)
            and all(map(isinstance, captions, itertools.repeat(str))))


def sets_and_slots(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference-set sizes -> (set of each reference (R,), its position within the set (R,))."""
    sizes = np.asarray(sizes, dtype=np.int64)
    ref_set = np.repeat(np.arange(len(sizes)), sizes)
    return ref_set, np.arange(len(ref_set)) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def text_rows(hyps: Sequence[str], refs: Sequence[Sequence[str]], table: dict[str, int]) -> CaptionRows:
    """Whitespace-split captions -> word-id rows; unseen words extend `table`."""
    hyp_ids, hyp_lengths = ngrams.encode(list(map(str.split, hyps)), table)
    ref_ids, ref_lengths = ngrams.encode(list(map(str.split, itertools.chain.from_iterable(refs))), table)
    ngrams.check_word_count(len(table), "the captions being scored")
    ref_set, ref_slot = sets_and_slots([len(rs) for rs in refs])
    return CaptionRows(hyp_ids, hyp_lengths, np.arange(len(hyps)), ref_ids, ref_lengths, ref_set, ref_slot, len(refs))


class Cider:
    """Drop-in for pycocoevalcap's Cider: df from the references being scored."""

    def __init__(self, n: int = 4, sigma: float = 6.0) -> None:
        if not 1 <= n <= ngrams.MAX_ORDER:
            raise SaticError(f"CIDEr n-gram order must be 1..{ngrams.MAX_ORDER}, got {n}")
        self.n, self.sigma = n, sigma

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
        """gts/res: image id -> list of caption strings -> (corpus mean, (images,) scores in gts order)."""
        _, hyps, refs = check_captions(gts, res)
        scores = cider_scores(text_rows(hyps, refs, {}), None, self.n, self.sigma)
        return float(np.mean(scores)), scores

    def method(self) -> str:
        return "CIDEr"


def _as_int_array(x, what: str, ndim: int) -> np.ndarray:
    """numpy, lists or torch tensors (any device) -> int64 array of the given rank."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    array = np.asarray(x)
    if array.ndim != ndim or (array.size and array.dtype.kind not in "iu"):
        raise SaticError(f"{what}: expected a {ndim}-d integer array, got shape {array.shape} dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise SaticError(f"{what}: token ids must be >= 0")
    return array.astype(np.int64, copy=False)


def cut_at_end(tokens: np.ndarray) -> np.ndarray:
    """(S, T) -> (S,) lengths that keep everything up to and including the first 0 (the end token)."""
    if tokens.shape[1] == 0:
        return np.zeros(len(tokens), dtype=np.int64)
    is_end = tokens == 0
    return np.where(is_end.any(axis=1), is_end.argmax(axis=1) + 1, tokens.shape[1])


def kept_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, T) rows -> (their kept tokens back to back (N,), lengths (S,)), cut as `cut_at_end`."""
    lengths = cut_at_end(tokens)
    return tokens[np.arange(tokens.shape[1]) < lengths[:, None]], lengths


def is_token_word(word: str) -> bool:
    """Whether a df word is an integer token as the reference's array_to_str writes it ("0", "17"; not "017"): ASCII
    digits only ("²" is a digit to str.isdigit, and no number to int()), and few of them (int() refuses thousands)."""
    return word.isascii() and word.isdigit() and len(word) <= 18 and str(int(word)) == word


class CiderD:
    """CIDEr-D with given document frequencies (ruotianluo/cider's CiderD with a df file)."""

    def __init__(self, document_frequency: DocumentFrequency, n: int = 4, sigma: float = 6.0) -> None:
        if not 1 <= n <= ngrams.MAX_ORDER:
            raise SaticError(f"CIDEr-D n-gram order must be 1..{ngrams.MAX_ORDER}, got {n}")
        self.df, self.n, self.sigma = document_frequency, n, sigma
        self._token_word = self._token_lookup(document_frequency.words)

    @staticmethod
    def _token_lookup(words: Sequence[str]) -> np.ndarray:
        """(max token + 1,) word id of each integer token whose decimal string is a df word, else -1."""
        numeric = {int(w): i for i, w in enumerate(words) if is_token_word(w)}
        lookup = np.full(max(numeric, default=-1) + 1, -1, dtype=np.int64)
        lookup[list(numeric)] = list(numeric.values())
        return lookup

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
        """gts/res: image id -> list of caption strings -> (mean, (images,) scores in gts order)."""
        _, hyps, refs = check_captions(gts, res)
        rows = text_rows(hyps, refs, dict(self.df.word_ids))
        scores = cider_scores(rows, self.df, self.n, self.sigma)
        return float(np.mean(scores)), scores

    def _word_ids(self, tokens: np.ndarray) -> np.ndarray:
        """(N,) integer tokens -> (N,) df word ids; tokens unknown to the df get fresh ids."""
        lookup = self._token_word
        known = tokens < len(lookup)
        word = np.full(tokens.shape, -1, dtype=np.int64)
        word[known] = lookup[tokens[known]]
        unknown = word < 0
        fresh, rank = np.unique(tokens[unknown], return_inverse=True)
        ngrams.check_word_count(len(self.df.words) + len(fresh), "document frequencies plus new tokens")
        word[unknown] = len(self.df.words) + rank
        return word

    def score_token_ids(self, candidates, references: Sequence, image_index=None) -> np.ndarray:
        """CIDEr-D rewards of sampled token sequences; (M,) float64.

        candidates: (M, T) ints; each row is cut after its first 0 (the 0 is kept as a word, as
        the reference's array_to_str does). references: one (R_b, L) int array per image (rows cut
        the same way). image_index: (M,) image of each candidate; by default the M candidates are
        grouped by image in order (M // B consecutive candidates per image). Each image's
        reference vectors are built once however many candidates share them.
        """
        cands = _as_int_array(candidates, "candidates", 2)
        refs = [_as_int_array(r, f"references[{b}]", 2) for b, r in enumerate(references)]
        num_images = len(refs)
        if num_images == 0 or any(len(r) == 0 for r in refs):
            raise SaticError("every image needs at least one reference caption")
        if image_index is None:
            if len(cands) % num_images:
                raise SaticError(f"{len(cands)} candidates cannot be split evenly over {num_images} images; "
                                 "pass image_index")
            image_index = np.repeat(np.arange(num_images), len(cands) // num_images)
        image_index = _as_int_array(image_index, "image_index", 1)
        if len(image_index) != len(cands) or (len(image_index) and image_index.max() >= num_images):
            raise SaticError(f"image_index must give one image in 0..{num_images - 1} per candidate")
        hyp_tokens, hyp_lengths = kept_tokens(cands)
        ref_parts = [kept_tokens(r) for r in refs]
        ref_tokens = np.concatenate([t for t, _ in ref_parts])
        ref_lengths = np.concatenate([n for _, n in ref_parts])
        words = self._word_ids(np.concatenate([hyp_tokens, ref_tokens]))
        ref_set, ref_slot = sets_and_slots([len(r) for r in refs])
        rows = CaptionRows(words[: len(hyp_tokens)], hyp_lengths, image_index, words[len(hyp_tokens) :],
                           ref_lengths, ref_set, ref_slot, num_images)
        return cider_scores(rows, self.df, self.n, self.sigma)

    def method(self) -> str:
        return "CIDEr-D"
