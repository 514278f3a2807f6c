"""The caption vocabulary. Index 0 is BOS, EOS and padding at once; words are 1..V."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence

from satic.errors import SaticError, first_few
from satic.io import is_unicode

UNK = "UNK"


def word_problem(word: str) -> str | None:
    """Why a word cannot be one of a vocabulary's, or None. Captions are words joined by spaces: an empty word, or
    one with a space or a line break in it, would come out as other words, or as captions broken over lines; a lone
    surrogate (JSON can hold one) is no text a file can be written in."""
    if word.split() != [word]:
        return "not one word without spaces"
    if not is_unicode(word):
        return "which is not valid Unicode text (a lone surrogate)"
    return None


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]  # words[i - 1] is the word of index i

    def __post_init__(self) -> None:
        # The one duplicate the reference's prepro_labels.py makes: captions that use the token 'UNK' often
        # enough to keep it, while rarer words are dropped, get 'UNK' appended once more; the last one is used.
        words = self.words[:-1] if self.words[-1:] == (UNK,) and UNK in self.words[:-1] else self.words
        if len(set(words)) != len(words):
            first: dict[str, int] = {}
            i, word = next((i, w) for i, w in enumerate(words, start=1) if first.setdefault(w, i) != i)
            raise SaticError(f"vocabulary has duplicate words ({word!r} is word {first[word]} and word {i})")

    @classmethod
    def from_ix_to_word(cls, ix_to_word: Mapping, source: str = "vocabulary",
                        fix: str = "re-create the file") -> "Vocabulary":
        """From the reference's {"1": "a", ...} mapping (keys 1..V, strings or ints; words are strings)."""
        if not isinstance(ix_to_word, Mapping):
            raise SaticError(f"{source}: ix_to_word must be a mapping of indices 1..V to words "
                             f"({{\"1\": \"a\", ...}}), got {type(ix_to_word).__name__} {_short(ix_to_word)}; {fix}")
        bad = next(((k, v) for k, v in ix_to_word.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise SaticError(f"{source}: ix_to_word[{bad[0]!r}] is {_short(bad[1])}; every word must be a string; "
                             f"{fix}")
        try:
            by_index = {int(k): str(v) for k, v in ix_to_word.items()}
        except (TypeError, ValueError) as err:
            raise SaticError(f"{source}: ix_to_word keys must be integers 1..V ({err}); {fix}") from err
        if not by_index:  # a model needs a word to emit besides the end (a hand-made file, or one cut short)
            raise SaticError(f"{source}: ix_to_word holds no words; {fix}")
        if sorted(by_index) != list(range(1, len(by_index) + 1)):
            raise SaticError(f"{source}: ix_to_word keys must be exactly 1..{len(by_index)}; {fix}")
        words = tuple(by_index[i] for i in range(1, len(by_index) + 1))
        odd = next(((i, word) for i, word in enumerate(words, start=1) if word_problem(word)), None)
        if odd is not None:
            raise SaticError(f"{source}: ix_to_word['{odd[0]}'] is {_short(odd[1])}, {word_problem(odd[1])}; {fix}")
        try:
            return cls(words)
        except SaticError as err:  # a word listed twice, named with the file
            raise SaticError(f"{source}: {err}; {fix}") from None

    @cached_property
    def word_to_index(self) -> dict[str, int]:
        """Built once per vocabulary: encoding a corpus must not rebuild it per caption. A repeated 'UNK'
        maps to its last index, as the reference's wtoi."""
        return {w: i for i, w in enumerate(self.words, start=1)}

    def to_ix_to_word(self) -> dict[str, str]:
        return {str(i): w for i, w in enumerate(self.words, start=1)}

    def check_same(self, other: "Vocabulary", source: str, fix: str) -> None:
        """Refuse `other`, the vocabulary `source` (a checkpoint) was trained with, unless it is this one, the
        data's; the message lists the first differences, then `fix`."""
        if other != self:
            raise SaticError(f"{source} was trained with another vocabulary than this run's data "
                             f"({first_few(self.differences(other), sep='; ')}); {fix}")

    def differences(self, other: "Vocabulary") -> list[str]:
        """How `other` differs from this vocabulary, for messages: its size, then the indices whose words differ."""
        problems = [f"{len(other)} words, not {len(self)}"] if len(other) != len(self) else []
        return problems + [f"word {i} is {theirs!r}, not {ours!r}"
                           for i, (ours, theirs) in enumerate(zip(self.words, other.words), start=1) if ours != theirs]

    def __len__(self) -> int:
        """Number of words; a model over this vocabulary has len(vocab) + 1 outputs."""
        return len(self.words)

    @property
    def unk_index(self) -> int | None:
        return self.word_to_index.get(UNK)

    def index(self, word: str) -> int:
        if word in self.word_to_index:
            return self.word_to_index[word]
        if self.unk_index is None:
            raise SaticError(f"word {word!r} is not in the vocabulary and it has no UNK")
        return self.unk_index

    def encode(self, tokens: Iterable[str]) -> list[int]:
        lookup = self.word_to_index
        unk = self.unk_index
        out = []
        for t in tokens:
            if t in lookup:
                out.append(lookup[t])
            elif unk is not None:
                out.append(unk)
            else:
                raise SaticError(f"word {t!r} is not in the vocabulary and it has no UNK")
        return out

    def tokens(self, seq: Sequence[int]) -> list[int]:
        """Token ids cut at the first 0 (the end of the caption)."""
        out = []
        for ix in seq:
            ix = int(ix)
            if ix == 0:
                break
            out.append(ix)
        return out

    def decode(self, seq: Sequence[int]) -> str:
        """Words joined by single spaces, cut at the first 0, as the reference's decode_sequence."""
        return " ".join(self.words[ix - 1] for ix in self.tokens(seq))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
