"""N-grams as packed integers, so that CIDEr's counting becomes sorting and bincounts.

A word is a small integer id (its index in some word table). An n-gram of order n <= 4 is packed
into one uint64 as n base-2^16 digits, each digit `id + 1`; a digit 0 means "no word", so n-grams
of different orders never share a key. Word ids must therefore be below 65535.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np

from satic.errors import SaticError

MAX_ORDER = 4
BITS = 16
MAX_WORDS = (1 << BITS) - 1  # ids 0..65534; digit 0 is reserved for "no word"


def check_word_count(num_words: int, what: str) -> None:
    if num_words > MAX_WORDS:
        raise SaticError(
            f"{what} has {num_words} distinct words; CIDEr n-gram keys hold at most {MAX_WORDS}. "
            "Tokenize and lower-case the captions first, or score the corpus in parts"
        )


def encode(captions: Sequence[Sequence[str]], table: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (word ids of all captions back to back (N,), lengths (S,)); unseen words
    extend `table`.

    Works on the flat token list with C-level map/dict calls: a Python loop per token would
    cost more than all the CIDEr maths.
    """
    lengths = np.fromiter(map(len, captions), dtype=np.int64, count=len(captions))
    tokens = list(itertools.chain.from_iterable(captions))
    for word in dict.fromkeys(tokens):  # distinct words only, in order of first sight
        table.setdefault(word, len(table))
    return np.fromiter(map(table.__getitem__, tokens), dtype=np.int64, count=len(tokens)), lengths


def starts_of_runs(*columns: np.ndarray) -> np.ndarray:
    """(E,) bool: True where any of the (sorted-together) columns changes value."""
    new = np.zeros(len(columns[0]), dtype=bool)
    new[:1] = True
    for c in columns:
        new[1:] |= c[1:] != c[:-1]
    return new


def ngram_occurrences(
    ids: np.ndarray, lengths: np.ndarray, max_order: int = MAX_ORDER
) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram occurrence (orders 1..max_order) of captions stored back to back.

    ids (N,) int64 word ids, lengths (S,) summing to N -> row (E,) int64, key (E,) uint64;
    within each key the occurrences are in row order.
    """
    parts = list(occurrences_by_order(ids, lengths, max_order))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    return np.concatenate([row for row, _ in parts]), np.concatenate([key for _, key in parts])


def occurrences_by_order(
    ids: np.ndarray, lengths: np.ndarray, max_order: int = MAX_ORDER
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """ngram_occurrences one order at a time, from 1 up: (row, key) of the n-grams of order n. The keys of a
    higher order are all larger (one more non-zero digit), so a corpus's n-grams can be counted order by order."""
    total = len(ids)
    row_of = np.repeat(np.arange(len(lengths)), lengths)  # (N,)
    left = np.repeat(np.cumsum(lengths), lengths) - np.arange(total)  # (N,) tokens from here to the end
    digits = (ids + 1).astype(np.uint64)
    key = np.zeros(total, dtype=np.uint64)
    for n in range(1, min(max_order, total) + 1):
        key = (key[: total - n + 1] << np.uint64(BITS)) | digits[n - 1 :]  # n-gram starting at each token
        valid = left[: total - n + 1] >= n  # (N-n+1,) the n-gram stays inside its caption
        yield row_of[: total - n + 1][valid], key[valid]


def key_order(keys: np.ndarray) -> np.ndarray:
    """(G,) uint64 packed keys -> (G,) int64 n-gram orders (number of non-zero digits)."""
    order = np.zeros(keys.shape, dtype=np.int64)
    for d in range(MAX_ORDER):
        order += ((keys >> np.uint64(BITS * d)) & np.uint64(MAX_WORDS)) != 0
    return order


def pack(ngrams: np.ndarray) -> np.ndarray:
    """(G, n) int64 word ids of n-grams of one order -> (G,) uint64 keys."""
    keys = np.zeros(len(ngrams), dtype=np.uint64)
    for j in range(ngrams.shape[1]):
        keys = (keys << np.uint64(BITS)) | (ngrams[:, j] + 1).astype(np.uint64)
    return keys


def unpack(keys: np.ndarray, order: int) -> np.ndarray:
    """(G,) uint64 keys of one order -> (G, order) int64 word ids (inverse of `pack`)."""
    shifts = np.uint64(BITS) * np.arange(order - 1, -1, -1, dtype=np.uint64)  # (order,)
    return ((keys[:, None] >> shifts) & np.uint64(MAX_WORDS)).astype(np.int64) - 1


def document_counts(
    doc_of_row: np.ndarray, row: np.ndarray, key: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Number of documents (reference sets) containing each n-gram.

    doc_of_row (S,) non-decreasing, row (E,), key (E,) as `ngram_occurrences` returns them -> keys (G,) uint64
    sorted, counts (G,) int64. One stable sort by key leaves each key's occurrences in document order, so
    distinct (key, document) pairs are runs.
    """
    by_key = np.argsort(key, kind="stable")
    key, doc = key[by_key], doc_of_row[row[by_key]]  # (E,)
    new_key = starts_of_runs(key)
    new_doc = starts_of_runs(key, doc)
    counts = np.bincount(np.cumsum(new_key)[new_doc] - 1, minlength=int(new_key.sum()))
    return key[new_key], counts.astype(np.int64)
