import pickle
from collections import defaultdict

import pytest

from satic.errors import SaticError
from satic.evaluation import DocumentFrequency
from satic.evaluation.document_frequency import DEFAULT_FILENAME, load_reference_pickle

REFS = [
    [["a", "dog", "runs", "0"], ["a", "dog", "a", "dog", "0"]],
    [["a", "cat", "0"]],
    [["two", "dogs", "0"], ["a", "dog", "0"]],
]


def straightforward_df(refs):
    """The reference's definition: each image adds 1 to every n-gram (n <= 4) of its captions."""
    df = defaultdict(int)
    for image in refs:
        seen = {tuple(c[i:i + n]) for c in image for n in range(1, 5) for i in range(len(c) - n + 1)}
        for ngram in seen:
            df[ngram] += 1
    return dict(df)


def test_from_references_counts_each_image_once():
    df = DocumentFrequency.from_references(REFS)
    assert dict(df.items()) == straightforward_df(REFS)
    assert df.count(("a", "dog")) == 2
    assert df.count(("a", "dog", "a", "dog")) == 1
    assert df.count(("zebra",)) == 0
    assert df.num_ref_sets == 3
    assert df.ref_len == pytest.approx(1.0986122886681098, abs=1e-15)


def test_save_load_round_trip(tmp_path):
    df = DocumentFrequency.from_references(REFS)
    path = tmp_path / DEFAULT_FILENAME
    df.save(path)
    back = DocumentFrequency.load(path)
    assert dict(back.items()) == dict(df.items())
    assert back.num_ref_sets == df.num_ref_sets
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no temp file left


@pytest.mark.parametrize("content", ["{not json", '{"format": "other"}',
                                     '{"format": "satic.cider_document_frequency", "version": 1}'])
def test_load_corrupt_file_names_it(tmp_path, content):
    path = tmp_path / DEFAULT_FILENAME
    path.write_text(content)
    with pytest.raises(SaticError, match=str(path)):
        DocumentFrequency.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(SaticError, match="not found"):
        DocumentFrequency.load(tmp_path / "nope.json")


def test_load_rejects_out_of_range_word_index(tmp_path):
    data = DocumentFrequency.from_references(REFS).to_json()
    data["document_frequency"][0]["ngrams"][0] = [99]
    path = tmp_path / "bad.json"
    import json
    path.write_text(json.dumps(data))
    with pytest.raises(SaticError, match="word indices"):
        DocumentFrequency.load(path)


def test_reference_pickle_is_read(tmp_path):
    expected = straightforward_df(REFS)
    document_frequency = defaultdict(float, {k: float(v) for k, v in expected.items()})
    path = tmp_path / "coco-train-idxs.p"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps({"document_frequency": document_frequency, "ref_len": 3}, protocol))
        df = load_reference_pickle(path)
        assert dict(df.items()) == expected
        assert df.num_ref_sets == 3


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_reference_pickle_refuses_code(tmp_path, capsys):
    path = tmp_path / "evil.p"
    path.write_bytes(pickle.dumps({"document_frequency": {("a",): 1.0}, "ref_len": Evil()}))
    with pytest.raises(SaticError, match=rf"^{path}: refusing to load builtins.print; a reference document-frequency "
                                         "pickle may hold only a dict of n-gram counts$"):
        load_reference_pickle(path)
    assert "pwned" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps({"document_frequency": {("a",): 1.0}, "ref_len": 3})[:-9])  # cut short
    with pytest.raises(SaticError, match=rf"^{path} is not a readable reference document-frequency pickle "
                                         r"\(UnpicklingError: .*\); use the coco-train-idxs.p made by"):
        load_reference_pickle(path)


def test_reference_pickle_missing(tmp_path):
    with pytest.raises(SaticError, match="not found"):
        load_reference_pickle(tmp_path / "coco-train-idxs.p")


def test_count_of_unseen_ngrams_of_known_words_is_zero():
    df = DocumentFrequency.from_references(REFS)
    expected = straightforward_df(REFS)
    words = ["a", "dog", "runs", "cat", "two", "dogs", "0"]
    unseen = [g for g in ([w] for w in words)] + [[u, v] for u in words for v in words]
    unseen += [["a", "dog", "runs", "a"], ["dog", "a", "dog"], ["0", "a"]]
    for gram in unseen:
        assert df.count(tuple(gram)) == expected.get(tuple(gram), 0), gram
    assert sum(df.count(tuple(g)) == 0 for g in unseen) > 30


def test_zero_counts_are_dropped_and_the_table_still_saves_and_loads(tmp_path):
    """A zero count means "unseen" (a defaultdict(float) that was read from holds such entries); it is not
    kept, so the saved file (which allows only positive counts) loads again."""
    df = DocumentFrequency.from_counts({("a",): 2.0, ("b",): 0.0, ("a", "b"): 1.0, ("b", "a"): 0}, 2)
    assert dict(df.items()) == {("a",): 2, ("a", "b"): 1} and len(df) == 2
    assert df.count(("b",)) == 0
    df.save(tmp_path / DEFAULT_FILENAME)
    assert dict(DocumentFrequency.load(tmp_path / DEFAULT_FILENAME).items()) == {("a",): 2, ("a", "b"): 1}


def test_reference_pickle_of_one_image_is_read(tmp_path):
    path = tmp_path / "coco-train-idxs.p"
    path.write_bytes(pickle.dumps({"document_frequency": defaultdict(float, {("1",): 1.0, ("1", "0"): 1.0}),
                                   "ref_len": 1.0}, 2))
    df = load_reference_pickle(path)
    assert df.num_ref_sets == 1 and df.ref_len == 0.0
    assert dict(df.items()) == {("1",): 1, ("1", "0"): 1}
