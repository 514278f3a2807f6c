"""Packed n-gram keys: the word-count limit they hold, and packing round trips."""
import numpy as np
import pytest

from satic.errors import SaticError
from satic.evaluation.ngrams import MAX_WORDS, check_word_count, key_order, pack, unpack


def test_the_word_count_limit_is_inclusive():
    """Ids 0..65534 fit a 16-bit digit beside the reserved 0: exactly MAX_WORDS words are allowed."""
    check_word_count(MAX_WORDS, "corpus")
    with pytest.raises(SaticError, match=f"corpus has {MAX_WORDS + 1} distinct words"):
        check_word_count(MAX_WORDS + 1, "corpus")


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_pack_and_unpack_round_trip_up_to_the_largest_id(order):
    ngrams = np.array([[0] * order, [MAX_WORDS - 1] * order, list(range(7, 7 + order))], dtype=np.int64)
    keys = pack(ngrams)
    np.testing.assert_array_equal(unpack(keys, order), ngrams)
    np.testing.assert_array_equal(key_order(keys), [order] * 3)


def test_captions_without_words_have_no_ngram_occurrences():
    from satic.evaluation.ngrams import ngram_occurrences

    for lengths in ([], [0, 0]):
        row, key = ngram_occurrences(np.zeros(0, np.int64), np.array(lengths, np.int64))
        assert (row.tolist(), key.tolist(), row.dtype, key.dtype) == ([], [], np.int64, np.uint64)
    row, key = ngram_occurrences(np.array([4, 5], np.int64), np.array([0, 2, 0], np.int64), max_order=2)
    assert row.tolist() == [1, 1, 1] and key.tolist() == [5, 6, (5 << 16) | 6]
