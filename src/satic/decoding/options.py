"""Decoding options (the reference's names, except beam_groups) and the result of decoding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Container, Literal, Sequence

import torch
from torch import Tensor

# the reference's remove_bad_endings list (misc/utils.py)
BAD_ENDINGS = frozenset(("with", "in", "on", "of", "a", "at", "to", "for", "an", "this", "his", "her", "that", "the"))


def kept_words(words: Sequence, bad: Container = BAD_ENDINGS) -> int:
    """How many of `words` the reference's remove_bad_endings keeps: all but the trailing ones in `bad` (words,
    or their ids), and all of them when every word is in `bad`."""
    end = len(words)
    while end > 0 and words[end - 1] in bad:
        end -= 1
    return end or len(words)


def without_bad_endings(caption: str) -> str:
    """The caption without its trailing words from BAD_ENDINGS ("a dog on a" -> "a dog"), as the reference's
    remove_bad_endings; a caption made only of such words is kept whole, as there."""
    words = caption.split(" ")
    return " ".join(words[:kept_words(words)])


def recorded_options(decode: dict, name: str, check: Callable[[DecodeOptions], object] | None = None
                     ) -> DecodeOptions:
    """A checkpoint's decoding defaults (extra.decode of its config.json) as DecodeOptions, with `check`'s further
    demands: every reader refuses the same unusable value with the same message, naming the checkpoint."""
    from satic.config import from_dict
    from satic.errors import SaticError

    try:
        options = from_dict(DecodeOptions, decode, "decode options")
        if check is not None:
            check(options)
    except SaticError as err:
        raise SaticError(f"{name}: the decoding defaults in its config.json (extra.decode) are unusable: {err}; fix "
                         "or remove them, or re-save the checkpoint") from None
    return options


def checkpoint_defaults(max_length: int, length_penalty: str = "", remove_bad_endings: bool = False) -> dict:
    """A checkpoint's decoding defaults (extra.decode of its config.json): what the reference's eval.py takes (and
    requires) from a run's infos when it scores or distils the checkpoint; max_length always, the others where set."""
    defaults: dict = {"max_length": max_length}
    if length_penalty:
        defaults["length_penalty"] = length_penalty
    if remove_bad_endings:
        defaults["remove_bad_endings"] = True
    return defaults


# Bounds that keep every score finite: a lower temperature divides log-probs past float32's range; a higher one
# is infinite in float32, where the log-probs are divided, so a forbidden word's -inf becomes NaN and the row's draw
# word 0 (decoding_constraint would end every caption); a larger diversity penalty, or a length-penalty exponent
# whose (5 + length) ** A leaves float64's range, turns scores into +-inf (the reference gives the same non-numbers
# there).
MIN_TEMPERATURE = 1e-30
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)
MAX_DIVERSITY_LAMBDA = 1e6
MAX_LENGTH_ALPHA = 50.0


def check_temperature_bounds(temperature: float, name: str = "temperature", limit: str = "") -> None:
    """A positive `temperature` outside [MIN_TEMPERATURE, MAX_TEMPERATURE] raises the ValueError that names the
    option (`name`), the bounds and why; `limit` follows the lower bound's reason (what a caller may use instead)."""
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"{name} must be a finite number of at least {MIN_TEMPERATURE:g} (below it the log-probs "
                         f"overflow float32{limit}) and at most {MAX_TEMPERATURE:g}, float32's largest, got "
                         f"{temperature}")


@dataclass(frozen=True)
class DecodeOptions:
    sample_method: Literal["greedy", "sample"] = "greedy"  # argmax words, or draw them (beam_size 1 only)
    beam_size: int = 1  # >1: beam search (batched over images and beams)
    temperature: float = 1.0  # sampling: probabilities ~ exp(logprob / temperature)
    top_k: int = 0  # sampling: keep only the k most likely words (0 = all)
    top_p: float = 1.0  # sampling: keep the smallest set of words whose probability reaches p (1 = all)
    sample_n: int = 1  # captions per image (greedy/sampling); rows are image-major
    max_length: int = 20  # decode length; groups stop when t + K > max_length (beam: last position max_length-1)
    length_penalty: str = ""  # beam ranking: '' (summed log-prob), 'wu_A' ((5+len)^A/6^A) or 'avg_A' (mean)
    decoding_constraint: bool = False  # forbid a word right after itself
    block_trigrams: bool = False  # penalise a repeated trigram by log(1/2)*2 per earlier occurrence
    beam_groups: int = 1  # diverse beam search groups (the reference's group_size)
    diversity_lambda: float = 0.5  # diverse beam search: penalty per use of a word by earlier groups
    n_best: int = 1  # beam: finished beams returned per image (at most beam_size)
    suppress_unk: bool = True  # beam: subtract 1000 from the last word's log-prob (UNK), as the reference
    remove_bad_endings: bool = False  # text only: drop trailing words such as 'a', 'the', 'with' (BAD_ENDINGS)

    def __post_init__(self) -> None:
        if self.sample_method not in ("greedy", "sample"):
            raise ValueError(f"sample_method must be 'greedy' or 'sample', got {self.sample_method!r}")
        for name in ("beam_size", "sample_n", "max_length", "beam_groups", "n_best"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        check_temperature_bounds(self.temperature, limit="; sample_method='greedy' is the limit")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**63:
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off; above the vocabulary size it keeps "
                             f"every word), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not abs(self.diversity_lambda) <= MAX_DIVERSITY_LAMBDA:
            raise ValueError(f"diversity_lambda must be a number from -{MAX_DIVERSITY_LAMBDA:g} to "
                             f"{MAX_DIVERSITY_LAMBDA:g}, got {self.diversity_lambda}")
        if self.length_penalty and not is_length_penalty(self.length_penalty):
            raise ValueError(f"length_penalty must be '', 'wu_A' or 'avg_A' with |A| <= {MAX_LENGTH_ALPHA:g} "
                             f"(e.g. wu_0.9), got {self.length_penalty!r}")
        if self.beam_size % self.beam_groups:
            raise ValueError(f"beam_size ({self.beam_size}) must be a multiple of beam_groups ({self.beam_groups})")
        if self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) cannot exceed beam_size ({self.beam_size})")
        if self.beam_size > 1 and self.sample_method != "greedy":
            raise ValueError("beam search (beam_size > 1) needs sample_method='greedy'")
        if self.beam_size > 1 and self.sample_n > 1:
            raise ValueError("use n_best, not sample_n, to get several captions from beam search")

    @property
    def rows_per_image(self) -> int:
        """DecodeResult rows per image: the captions returned for each (n_best or sample_n)."""
        return self.n_best if self.beam_size > 1 else self.sample_n

    @property
    def decoder_rows(self) -> int:
        """Rows decoded per image: beam_size for beam search, sample_n otherwise."""
        return self.beam_size if self.beam_size > 1 else self.sample_n

    @property
    def length_penalty_parts(self) -> tuple[str, float]:
        """length_penalty as (kind, alpha): ('', 0.0) when off, else ('wu' or 'avg', A)."""
        kind, _, alpha = self.length_penalty.partition("_")
        return kind, float(alpha or 0.0)

    def penalize_length(self, length: int, score: float) -> float:
        """The reference's penalty_builder: a finished beam's score from its summed log-prob."""
        kind, alpha = self.length_penalty_parts
        if kind == "wu":
            return score / (((5 + length) ** alpha) / ((5 + 1) ** alpha))
        return score / length if kind == "avg" else score


def is_length_penalty(text: str) -> bool:
    """'wu_A' or 'avg_A' with A a number as the reference's float(alpha) reads it, |A| <= MAX_LENGTH_ALPHA."""
    kind, _, alpha = text.partition("_")
    try:
        return kind in ("wu", "avg") and "_" not in alpha and abs(float(alpha)) <= MAX_LENGTH_ALPHA
    except ValueError:
        return False


@dataclass
class DecodeResult:
    seq: Tensor  # (B*n, max_length) long: words, 0 after the end; rows image-major
    logprobs: Tensor  # (B*n, max_length) float32: log-prob of each chosen word, 0 after the finishing group
    scores: Tensor  # (B*n,) float64: beam: the ranking score (after length penalty); else summed log-prob
    # greedy/sampling only: the word drawn at every position of the steps the loop ran (also where the
    # output is 0: a row's groups after its finishing group), 0 elsewhere; and its log-prob (R, T)
    draws: Tensor | None = None
    draw_logprobs: Tensor | None = None

    def to(self, device: torch.device | str) -> "DecodeResult":
        moved = [None if t is None else t.to(device) for t in (self.draws, self.draw_logprobs)]
        return DecodeResult(self.seq.to(device), self.logprobs.to(device), self.scores.to(device), *moved)
