"""CIDEr-D document frequencies: how many reference sets contain each n-gram.

SCST rewards score samples against training references with frequencies from the whole training
corpus, so they are computed once (by `satic prepro`) and saved as JSON. The reference code ships
the same statistics as a pickle (coco-train-idxs.p); `load_reference_pickle` reads it without
running arbitrary pickle code, and `load_document_frequency` reads either.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Mapping, Sequence

import numpy as np

from satic.errors import SaticError
from satic.evaluation import ngrams
from satic.io import atomic_path, read_json, read_restricted_pickle, require_file

DEFAULT_FILENAME = "cider_df.json"
FORMAT = "satic.cider_document_frequency"
VERSION = 1
SAVE_SLICE = 1 << 16  # n-grams turned into text at a time by DocumentFrequency.save
CHECK_SLICE = 1 << 18  # n-grams whose layout DocumentFrequency.load checks at a time


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
        # order by order (keys of a higher order are larger, so the tables join sorted): a quarter of the
        # occurrences in memory at once
        tables = [ngrams.document_counts(doc_of_row, row, key)
                  for row, key in ngrams.occurrences_by_order(ids, lengths)]
        keys = np.concatenate([keys for keys, _ in tables]) if tables else np.zeros(0, np.uint64)
        counts = np.concatenate([counts for _, counts in tables]) if tables else np.zeros(0, np.int64)
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
            if (not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value))
                    or value != int(value) or value < 0):
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
        try:
            values = [np.asarray(v, dtype=np.int64) for _, v in by_order.values()]
        except OverflowError:  # a whole number beyond int64, which no count of reference sets reaches
            raise SaticError(f"{source}: a count is too large (more than {np.iinfo(np.int64).max})") from None
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

    def to_json_header(self) -> dict:
        """to_json() without its n-gram tables."""
        return {"format": FORMAT, "version": VERSION, "num_ref_sets": self.num_ref_sets,
                "ref_len": self.ref_len, "words": list(self.words)}

    def to_json(self) -> dict:
        orders = ngrams.key_order(self.keys)
        tables = []
        for n in range(1, ngrams.MAX_ORDER + 1):
            chosen = orders == n
            tables.append({"n": n, "ngrams": ngrams.unpack(self.keys[chosen], n).tolist(),
                           "counts": self.counts[chosen].tolist()})
        return {**self.to_json_header(), "document_frequency": tables}

    def save(self, path: str | os.PathLike) -> None:
        """to_json() as json.dumps writes it (one line), written a slice of n-grams at a time: the n-grams of
        COCO's training captions as Python lists would take gigabytes."""
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for text in self.json_text():
                f.write(text)

    def json_text(self) -> Iterator[str]:
        """The text of json.dumps(self.to_json()) + "\n", in pieces of at most SAVE_SLICE n-grams."""
        head = self.to_json_header()
        yield json.dumps(head)[:-1] + ', "document_frequency": ['
        orders = ngrams.key_order(self.keys)
        for n in range(1, ngrams.MAX_ORDER + 1):
            chosen = np.flatnonzero(orders == n)
            row = "[" + ", ".join(["%d"] * n) + "]"
            yield ("" if n == 1 else ", ") + f'{{"n": {n}, "ngrams": ['
            # flat lists of ints, formatted at once: no list per n-gram for the garbage collector to walk through
            for start in range(0, len(chosen), SAVE_SLICE):
                ids = ngrams.unpack(self.keys[chosen[start:start + SAVE_SLICE]], n)  # (S, n)
                yield ("" if start == 0 else ", ") + ", ".join([row] * len(ids)) % tuple(ids.ravel().tolist())
            yield '], "counts": ['
            for start in range(0, len(chosen), SAVE_SLICE):
                counts = self.counts[chosen[start:start + SAVE_SLICE]].tolist()
                yield ("" if start == 0 else ", ") + ", ".join(map(str, counts))
            yield "]}"
        yield "]}\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DocumentFrequency":
        """A file laid out as save() writes it (every bracket, comma and space where save() puts them) is read as
        numbers straight into arrays, with the checks of the JSON reading: COCO's n-grams as JSON lists would take
        gigabytes. Any other JSON text is read as JSON and checked field by field."""
        try:
            text = require_file(path, "CIDEr-D document frequency file").read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = None  # named by read_json
        saved = None if text is None else cls._from_saved_text(text)
        del text
        return saved if saved is not None else cls._load_json(path)

    @classmethod
    def _from_saved_text(cls, text: str) -> "DocumentFrequency | None":
        """The table in `text` when its n-gram tables are laid out as save() writes them and hold a valid table
        (what the JSON reading would give); None for any other text."""
        start = text.find(', "document_frequency": [')
        if start < 0 or not text.startswith('{"format": '):
            return None
        try:
            head = json.loads(text[:start] + "}")
            words, num_ref_sets = tuple(head["words"]), head["num_ref_sets"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        if (head.get("format") != FORMAT or head.get("version") != VERSION or not isinstance(num_ref_sets, int)
                or num_ref_sets < 1 or not all(isinstance(w, str) for w in words) or len(set(words)) != len(words)):
            return None
        by_order = {}
        pos = start + len(', "document_frequency": [')
        for n in range(1, ngrams.MAX_ORDER + 1):
            opening = ("" if n == 1 else ", ") + f'{{"n": {n}, "ngrams": ['
            if not text.startswith(opening, pos):
                return None
            middle = text.find('], "counts": [', pos)
            end = text.find("]}", middle)
            if middle < 0 or end < 0:
                return None
            ids = _saved_list(text[pos + len(opening):middle], n)
            counts = _saved_list(text[middle + len('], "counts": ['):end], 0)
            if ids is None or counts is None or len(ids) != len(counts):
                return None
            if len(ids) and (ids.max() >= len(words) or counts.min() < 1):
                return None
            by_order[n] = (ids, counts)
            pos = end + len("]}")
        if text[pos:] != "]}\n":
            return None
        try:
            return cls._from_orders(words, by_order, num_ref_sets, "saved text")
        except SaticError:
            return None

    @classmethod
    def _load_json(cls, path: str | os.PathLike) -> "DocumentFrequency":
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


_BRACKETS = str.maketrans("[]", "  ")
_DIGITS_AND_COMMAS = re.compile(r"[0-9, ]*")
_POWERS_OF_TEN = 10 ** np.arange(1, 19, dtype=np.int64)


def _saved_list(text: str, width: int) -> np.ndarray | None:
    """The inside of a JSON list as save() writes it: (K, width) int64 of rows "[1, 2], [3, 4]" (width 2), or (K,)
    of numbers "5, 6" (width 0); None for any other text (the JSON reading then takes it)."""
    if not text:
        return np.zeros((0, width) if width else 0, np.int64)
    flat = text.translate(_BRACKETS)
    if not _DIGITS_AND_COMMAS.fullmatch(flat):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # text numpy cannot read to its end
        try:
            values = np.fromstring(flat, dtype=np.int64, sep=",")
        except (ValueError, DeprecationWarning):
            return None
    per_row = max(width, 1)
    if len(values) == 0 or len(values) % per_row:
        return None
    chars = np.frombuffer(text.encode("ascii"), np.uint8)
    separators = len(chars) - int(np.count_nonzero((chars >= ord("0")) & (chars <= ord("9"))))
    # where save() puts each character that is not a digit: ", " before each value but the first, "[" before and
    # "]" after each row's values; checked a slice of rows at a time, so that the positions take little memory
    end = 0  # the text checked so far
    for lo in range(0, len(values), per_row * CHECK_SLICE):
        part = values[lo:lo + per_row * CHECK_SLICE]
        digits = np.searchsorted(_POWERS_OF_TEN, part, side="right") + 1  # as "%d" prints each
        if digits.max() >= 19:  # beyond int64's range, where fromstring saturates
            return None
        column = np.arange(lo, lo + len(part)) % per_row
        row_start = column == 0 if width else np.zeros(len(part), bool)
        row_end = column == per_row - 1 if width else row_start
        before = 2 + row_start
        if lo == 0:
            before[0] -= 2
        ends = end + np.cumsum(before + digits + row_end)  # after each value and its "]"
        if ends[-1] > len(chars):
            return None
        first = ends - row_end - digits  # each value's first digit
        comma = (first - before)[before >= 2]
        if not (np.all(chars[comma] == ord(",")) and np.all(chars[comma + 1] == ord(" "))
                and np.all(chars[first[row_start] - 1] == ord("[")) and np.all(chars[ends[row_end] - 1] == ord("]"))):
            return None
        separators -= int(before.sum() + row_end.sum())
        end = int(ends[-1])
    if end != len(chars) or separators != 0:  # every other character is a digit
        return None
    return values.reshape(-1, width) if width else values


# The reference pickle holds a defaultdict(float) of n-gram tuples: plain containers only. A defaultdict(int) names
# its type "__builtin__ int" from Python 2, "builtins int" from Python 3, and "__builtin__ long" from Python 3 at
# pickle protocol 2 or lower (the name Python 2 gives its unbounded integers).
_REFERENCE_PICKLE_ALLOWED = {("collections", "defaultdict"): defaultdict, ("builtins", "float"): float,
                             ("__builtin__", "float"): float, ("builtins", "int"): int, ("__builtin__", "int"): int,
                             ("__builtin__", "long"): int}


def load_reference_pickle(path: str | os.PathLike) -> DocumentFrequency:
    """Read the reference code's coco-train-idxs.p ({'document_frequency', 'ref_len'})."""
    data = read_restricted_pickle(path, _REFERENCE_PICKLE_ALLOWED, "reference document-frequency pickle",
                                  "a dict of n-gram counts", "use the coco-train-idxs.p made by the reference's "
                                  "prepro_ngrams.py")
    if not isinstance(data, dict) or not isinstance(data.get("document_frequency"), dict):
        raise SaticError(f"{path}: expected a dict with 'document_frequency' and 'ref_len'")
    ref_len = data.get("ref_len")
    if (not isinstance(ref_len, (int, float)) or (isinstance(ref_len, float) and not math.isfinite(ref_len))
            or ref_len < 1 or ref_len != int(ref_len)):
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
