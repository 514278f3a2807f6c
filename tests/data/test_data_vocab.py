"""The caption vocabulary: index 0 ends a caption, words are 1..V; the reference's ix_to_word both ways."""
import pytest

from satic.data.vocab import Vocabulary
from satic.errors import SaticError


def test_words_are_numbered_from_one():
    vocab = Vocabulary(("a", "dog", "UNK"))
    assert [vocab.index(w) for w in ("a", "dog", "UNK")] == [1, 2, 3]
    assert vocab.index("cat") == 3 == vocab.unk_index  # unknown words are UNK
    assert vocab.encode(["dog", "cat", "a"]) == [2, 3, 1]
    assert vocab.decode([2, 1, 0, 2]) == "dog a" and vocab.tokens([2, 1, 0, 2]) == [2, 1]
    assert vocab.to_ix_to_word() == {"1": "a", "2": "dog", "3": "UNK"}
    assert Vocabulary.from_ix_to_word({"2": "dog", 1: "a", "3": "UNK"}) == vocab
    with pytest.raises(SaticError, match="word 'cat' is not in the vocabulary and it has no UNK"):
        Vocabulary(("a",)).index("cat")
    with pytest.raises(SaticError, match="^word 'cat' is not in the vocabulary and it has no UNK$"):
        Vocabulary(("a",)).encode(["a", "cat"])


def test_token_ids_of_arrays_are_plain_ints():
    """Decoded rows arrive as numpy or torch integers; their token ids are Python ints, as JSON writes them."""
    import json

    import numpy as np
    import torch

    vocab = Vocabulary(("a", "dog"))
    assert json.dumps(vocab.tokens(np.array([2, 1, 0, 2]))) == json.dumps(vocab.tokens(torch.tensor([2, 1, 0]))) \
        == "[2, 1]"


def test_duplicate_words_are_refused():
    with pytest.raises(SaticError, match="vocabulary has duplicate words"):
        Vocabulary(("a", "dog", "a"))
    for words in (("a", "UNK", "UNK", "UNK"), ("UNK", "a", "UNK", "a"), ("a", "UNK", "UNK", "b")):
        with pytest.raises(SaticError, match="vocabulary has duplicate words"):
            Vocabulary(words)


def test_an_info_file_listing_a_word_twice_is_refused_naming_the_file_and_the_word(tmp_path):
    import json

    from satic.data.labels import read_cocotalk

    (tmp_path / "cocotalk.json").write_text(json.dumps({"ix_to_word": {"1": "a", "2": "dog", "3": "a"}, "images": []}))
    with pytest.raises(SaticError, match=r"cocotalk.json: vocabulary has duplicate words \('a' is word 1 and word 3\); "
                                         r"re-create it with `satic prepro`$"):
        read_cocotalk(tmp_path / "cocotalk.json")


def test_the_references_repeated_unk_is_read_and_the_last_one_used():
    """prepro_labels.py appends 'UNK' to a vocabulary that already kept a caption token 'UNK'."""
    vocab = Vocabulary.from_ix_to_word({"1": "UNK", "2": "a", "3": "UNK"})
    assert vocab.words == ("UNK", "a", "UNK") and len(vocab) == 3
    assert vocab.unk_index == 3 == vocab.index("UNK") == vocab.index("zebra")
    assert vocab.encode(["UNK", "a", "zebra"]) == [3, 2, 3]
    assert vocab.decode([1, 2, 3]) == "UNK a UNK"


def test_long_values_are_shortened_in_messages():
    with pytest.raises(SaticError, match=r"got list \['a', 'b'\]; re-create the file"):
        Vocabulary.from_ix_to_word(["a", "b"])
    with pytest.raises(SaticError) as info:
        Vocabulary.from_ix_to_word({"1": ["w"] * 50})
    assert str(info.value) == ("vocabulary: ix_to_word['1'] is ['w', 'w', 'w', 'w', 'w', 'w', 'w', '...; every word "
                               "must be a string; re-create the file")
    for word, shown in ((["x" * 36], repr(["x" * 36])), (["x" * 37], repr(["x" * 37])[:37] + "...")):  # 40, 41 chars
        with pytest.raises(SaticError) as info:
            Vocabulary.from_ix_to_word({"1": word})
        assert str(info.value) == (f"vocabulary: ix_to_word['1'] is {shown}; every word must be a string; "
                                   "re-create the file")


def test_ix_to_word_keys_that_are_no_integers_are_refused():
    with pytest.raises(SaticError) as info:
        Vocabulary.from_ix_to_word({"1": "a", "two": "b"}, source="infos.pkl vocabulary", fix="re-train")
    assert str(info.value) == ("infos.pkl vocabulary: ix_to_word keys must be integers 1..V (invalid literal for int() "
                               "with base 10: 'two'); re-train")


@pytest.mark.parametrize("keys", [("0", "1"), ("1", "3"), ("2", "3"), ("-1", "1")])
def test_ix_to_word_keys_must_be_one_to_v(keys):
    with pytest.raises(SaticError, match=r"ix_to_word keys must be exactly 1\.\.2"):
        Vocabulary.from_ix_to_word(dict(zip(keys, ("a", "b"))))


def test_a_vocabulary_without_words_is_refused(tmp_path):
    """A hand-made cocotalk.json whose ix_to_word is {} gave a vocabulary of no words, which only failed later,
    in the model's config."""
    from satic.data.labels import read_cocotalk

    with pytest.raises(SaticError, match="^vocabulary: ix_to_word holds no words; re-create the file$"):
        Vocabulary.from_ix_to_word({})
    (tmp_path / "cocotalk.json").write_text('{"ix_to_word": {}, "images": []}')
    with pytest.raises(SaticError, match="cocotalk.json: ix_to_word holds no words; re-create it with `satic prepro`$"):
        read_cocotalk(tmp_path / "cocotalk.json")


def test_only_a_trailing_repeat_of_unk_is_allowed():
    vocab = Vocabulary(("a", "UNK", "b", "UNK"))
    assert vocab.unk_index == 4 and vocab.encode(["zebra", "b"]) == [4, 3]
    assert Vocabulary(("a", "UNK", "UNK")).unk_index == 3
    for words in (("UNK", "a", "a"), ("a", "UNK", "b", "b", "UNK")):
        with pytest.raises(SaticError, match="vocabulary has duplicate words"):
            Vocabulary(words)


def test_a_vocabulary_cannot_change_after_its_checks():
    import dataclasses

    vocab = Vocabulary(("a", "dog"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        vocab.words = ("a", "a")
    assert hash(vocab) == hash(Vocabulary(("a", "dog")))


def test_another_vocabulary_is_refused_with_its_differences():
    ours = Vocabulary(("a", "dog", "UNK"))
    ours.check_same(Vocabulary(("a", "dog", "UNK")), "the checkpoint", "use its data")
    assert ours.differences(Vocabulary(("a", "dog", "UNK"))) == []
    assert ours.differences(Vocabulary(("a", "cat", "UNK", "sky"))) == ["4 words, not 3", "word 2 is 'cat', not 'dog'"]
    assert ours.differences(Vocabulary(("the", "dog"))) == ["2 words, not 3", "word 1 is 'the', not 'a'"]
    with pytest.raises(SaticError) as info:
        ours.check_same(Vocabulary(("a", "cat", "UNK")), "the checkpoint", "use its data")
    assert str(info.value) == ("the checkpoint was trained with another vocabulary than this run's data "
                               "(word 2 is 'cat', not 'dog'); use its data")


@pytest.mark.parametrize("word, message", [
    ("", "ix_to_word['2'] is '', not one word without spaces"),
    ("hot dog", "ix_to_word['2'] is 'hot dog', not one word without spaces"),
    ("dog\n", r"ix_to_word['2'] is 'dog\n', not one word without spaces"),  # a caption broken over two lines
    ("\ud800", r"ix_to_word['2'] is '\ud800', which is not valid Unicode text (a lone surrogate)"),
])
def test_a_word_captions_could_not_hold_as_it_is_is_refused_by_its_index(word, message):
    with pytest.raises(SaticError) as info:
        Vocabulary.from_ix_to_word({"1": "a", "2": word, "3": "b"}, source="infos.pkl vocabulary")
    assert str(info.value) == f"infos.pkl vocabulary: {message}; re-create the file"
