"""CIDEr-D document frequencies: how many reference sets contain each n-gram.

SCST rewards score samples against training references with frequencies from the whole training
corpus, so they are computed once (by `satic prepro`) and saved as JSON. The reference code ships
the same statistics as a pickle (coco-train-idxs.p); `load_reference_pickle` reads it without
running arbitrary pickle code, and `load_document_frequency` reads either.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Mapping, Sequence

import numpy as np

from satic.errors import SaticError
from satic.evaluation import ngrams
from satic.io import read_json, read_restricted_pickle, write_json

DEFAULT_FILENAME = "cider_df.json"
FORMAT = "satic.cider_document_frequency"
VERSION = 1


@dataclass(frozen=True, eq=False)
class DocumentFrequency:
    words: tuple[str, ...]  # word table; the n-gram keys are packed over indices into it
    keys: np.ndarray  # (G,) uint64 packed n-grams (see satic.evaluation.ngrams), sorted ascending
    counts: np.ndarray  # (G,) int64 number of reference sets containing each n-gram
    num_ref_sets: int  # number of reference sets (images) counted

    def __post_init__(self) -> None:
        if self.num_ref_sets < 1:
            raise SaticError("document frequencies need at least one reference set")
        if len(self.keys) != len(self.counts):
            raise SaticError("document frequencies: keys and counts differ in length")
        ngrams.check_word_count(len(self.words), "document frequency table")

    @property
    def ref_len(self) -> float:
        """log(number of reference sets): CIDEr's idf of an n-gram is ref_len - log(df)."""
        return math.log(float(self.num_ref_sets))

    @cached_property
    def word_ids(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.keys)

    def count(self, ngram: Sequence[str]) -> int:
        """Document frequency of one n-gram (0 when unseen)."""
        if not 1 <= len(ngram) <= ngrams.MAX_ORDER or any(w not in self.word_ids for w in ngram):
            return 0
        key = ngrams.pack(np.array([[self.word_ids[w] for w in ngram]], dtype=np.int64))
        pos = int(np.searchsorted(self.keys, key[0]))
        return int(self.counts[pos]) if pos < len(self.keys) and self.keys[pos] == key[0] else 0

    def items(self) -> Iterator[tuple[tuple[str, ...], int]]:
        """(n-gram, document frequency) pairs, for inspection and tests."""
        orders = ngrams.key_order(self.keys)
        for n in range(1, ngrams.MAX_ORDER + 1):
            chosen = orders == n
            for ids, c in zip(ngrams.unpack(self.keys[chosen], n), self.counts[chosen]):
                yield tuple(self.words[i] for i in ids), int(c)

    @classmethod
    def from_references(cls, refs: Sequence[Sequence[Sequence[str]]]) -> "DocumentFrequency":
        """refs: one entry per image, a list of captions, each a list of string tokens.

        The reference's prepro feeds word-index strings with the end token "0" appended; pass
        the same tokens here to get the same statistics.
        """
        if len(refs) == 0:
            raise SaticError("document frequencies need at least one reference set")
        table: dict[str, int] = {}
        ids, lengths = ngrams.encode([c for image in refs for c in image], table)
        ngrams.check_word_count(len(table), "reference corpus")
        doc_of_row = np.repeat(np.arange(len(refs)), [len(image) for image in refs])  # (S,)
        row, key = ngrams.ngram_occurrences(ids, lengths)
        keys, counts = ngrams.document_counts(doc_of_row, row, key)
        return cls(tuple(table), keys, counts, len(refs))

    @classmethod
    def from_counts(
        cls, counts: Mapping[tuple[str, ...], float], num_ref_sets: int, source: str = "counts"
    ) -> "DocumentFrequency":
        """From an {n-gram tuple: count} mapping such as the reference pickle holds."""
        table: dict[str, int] = {}
        by_order: dict[int, tuple[list[list[int]], list[int]]] = defaultdict(lambda: ([], []))
        for ngram, value in counts.items():
            if not isinstance(ngram, tuple) or not 1 <= len(ngram) <= ngrams.MAX_ORDER:
                raise SaticError(f"{source}: n-gram {ngram!r} is not a tuple of 1..4 words")
            if not all(isinstance(w, str) for w in ngram):
                raise SaticError(f"{source}: n-gram {ngram!r} has a word that is not a string")
            if not isinstance(value, (int, float)) or value != int(value) or value < 0:
                raise SaticError(f"{source}: count {value!r} of {ngram!r} is not a whole number")
            ids, values = by_order[len(ngram)]
            ids.append([table.setdefault(w, len(table)) for w in ngram])
            values.append(int(value))
        ngrams.check_word_count(len(table), source)
        return cls._from_orders(tuple(table), by_order, num_ref_sets, source)

    @classmethod
    def _from_orders(
        cls, words: tuple[str, ...], by_order: Mapping[int, tuple[list, list]], num_ref_sets: int, source: str
    ) -> "DocumentFrequency":
        """Pack per-order id lists; drop zero counts (they equal "unseen")."""
        packed = [ngrams.pack(np.asarray(ids, dtype=np.int64).reshape(len(ids), n)) for n, (ids, _) in by_order.items()]
        values = [np.asarray(v, dtype=np.int64) for _, v in by_order.values()]
        keys = np.concatenate(packed) if packed else np.zeros(0, np.uint64)
        counts = np.concatenate(values) if values else np.zeros(0, np.int64)
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        if np.any(keys[1:] == keys[:-1]):
            raise SaticError(f"{source}: an n-gram is listed twice")
        if len(counts) and counts.max() > num_ref_sets:
            raise SaticError(f"{source}: a count exceeds the number of reference sets ({num_ref_sets})")
        keep = counts > 0
        return cls(words, keys[keep], counts[keep], int(num_ref_sets))

    def to_json(self) -> dict:
        orders = ngrams.key_order(self.keys)
        tables = []
        for n in range(1, ngrams.MAX_ORDER + 1):
            chosen = orders == n
            tables.append({"n": n, "ngrams": ngrams.unpack(self.keys[chosen], n).tolist(),
                           "counts": self.counts[chosen].tolist()})
        return {"format": FORMAT, "version": VERSION, "num_ref_sets": self.num_ref_sets,
                "ref_len": self.ref_len, "words": list(self.words), "document_frequency": tables}

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DocumentFrequency":
        data = read_json(path, "CIDEr-D document frequency file")
        fix = "re-create it with `satic prepro`"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SaticError(f"{path} is not a satic CIDEr-D document frequency file; {fix}")
        if data.get("version") != VERSION:
            raise SaticError(f"{path}: unsupported version {data.get('version')!r}; {fix}")
        try:
            words = tuple(data["words"])
            num_ref_sets = data["num_ref_sets"]
            by_order = {int(t["n"]): (t["ngrams"], t["counts"]) for t in data["document_frequency"]}
        except (KeyError, TypeError, ValueError) as err:
            raise SaticError(f"{path}: missing or malformed field ({err!r}); {fix}") from err
        if not all(isinstance(w, str) for w in words) or len(set(words)) != len(words):
            raise SaticError(f"{path}: 'words' must be distinct strings; {fix}")
        if not isinstance(num_ref_sets, int) or num_ref_sets < 1:
            raise SaticError(f"{path}: 'num_ref_sets' must be a positive integer; {fix}")
        for n, (ids, counts) in by_order.items():
            if not 1 <= n <= ngrams.MAX_ORDER or len(ids) != len(counts):
                raise SaticError(f"{path}: bad table for order {n}; {fix}")
            try:
                array = np.asarray(ids)
            except ValueError:  # ragged lists
                array = np.zeros((0, 0))
            if len(ids) and (array.shape != (len(ids), n) or array.dtype.kind != "i"
                             or array.min() < 0 or array.max() >= len(words)):
                raise SaticError(f"{path}: n-grams of order {n} must be lists of {n} word indices; {fix}")
            if not all(isinstance(c, int) and c >= 1 for c in counts):
                raise SaticError(f"{path}: counts of order {n} must be positive integers; {fix}")
        return cls._from_orders(words, by_order, num_ref_sets, str(path))


# The reference pickle holds a defaultdict(float) of n-gram tuples: plain containers only.
_REFERENCE_PICKLE_ALLOWED = {("collections", "defaultdict"): defaultdict, ("builtins", "float"): float,
                             ("__builtin__", "float"): float, ("builtins", "int"): int, ("__builtin__", "int"): int}


def load_reference_pickle(path: str | os.PathLike) -> DocumentFrequency:
    """Read the reference code's coco-train-idxs.p ({'document_frequency', 'ref_len'})."""
    data = read_restricted_pickle(path, _REFERENCE_PICKLE_ALLOWED, "reference document-frequency pickle",
                                  "a dict of n-gram counts", "use the coco-train-idxs.p made by the reference's "
                                  "prepro_ngrams.py")
    if not isinstance(data, dict) or not isinstance(data.get("document_frequency"), dict):
        raise SaticError(f"{path}: expected a dict with 'document_frequency' and 'ref_len'")
    ref_len = data.get("ref_len")
    if not isinstance(ref_len, (int, float)) or ref_len < 1 or ref_len != int(ref_len):
        raise SaticError(f"{path}: 'ref_len' must be the number of reference sets, got {ref_len!r}")
    return DocumentFrequency.from_counts(data["document_frequency"], int(ref_len), str(path))


REFERENCE_PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def load_document_frequency(path: str | os.PathLike) -> DocumentFrequency:
    """satic's cider_df.json, or the reference's coco-train-idxs.p (its --cached_tokens), told apart by the suffix
    or by the pickle's first byte."""
    if os.path.splitext(path)[1] in REFERENCE_PICKLE_SUFFIXES or _starts_like_pickle(path):
        return load_reference_pickle(path)
    return DocumentFrequency.load(path)


def _starts_like_pickle(path: str | os.PathLike) -> bool:
    """Pickle protocols 2 and later begin with the PROTO opcode, 0x80; no JSON text does."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:  # named by the loader
        return False
