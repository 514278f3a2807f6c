import json
import math
import pickle
import re
from collections import defaultdict

import numpy as np
import pytest

from satic.errors import SaticError
from satic.evaluation import DocumentFrequency, document_frequency, ngrams
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


@pytest.mark.parametrize("content, message", [
    ("{not json", ""), ('{"format": "other"}', " is not a satic CIDEr-D document frequency file; re-create it"),
    ("[1, 2]", " is not a satic CIDEr-D document frequency file; re-create it"),
    ('{"format": "satic.cider_document_frequency", "version": 1}', ": missing or malformed field")])
def test_load_corrupt_file_names_it(tmp_path, content, message):
    path = tmp_path / DEFAULT_FILENAME
    path.write_text(content)
    with pytest.raises(SaticError, match=re.escape(str(path) + message)):
        DocumentFrequency.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(SaticError, match="not found"):
        DocumentFrequency.load(tmp_path / "nope.json")


def test_load_rejects_out_of_range_word_index(tmp_path):
    data = DocumentFrequency.from_references(REFS).to_json()
    path = tmp_path / "bad.json"
    for index in (99, len(data["words"])):  # one past the last word too
        data["document_frequency"][0]["ngrams"][0] = [index]
        for indent in (None, 1):  # as save() lays it out, and other JSON text
            path.write_text(json.dumps(data, indent=indent))
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


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_reference_pickle_of_a_count_or_ref_len_that_is_no_number_is_refused(tmp_path, value):
    """NaN or an infinity as a count or as ref_len: named, not a ValueError or OverflowError from int()."""
    path = tmp_path / "coco-train-idxs.p"
    path.write_bytes(pickle.dumps({"document_frequency": {("1",): value}, "ref_len": 3.0}, 2))
    with pytest.raises(SaticError, match=rf"^{re.escape(str(path))}: count {value} of \('1',\) is not a whole "
                                         "number$"):
        load_reference_pickle(path)
    path.write_bytes(pickle.dumps({"document_frequency": {("1",): 1.0}, "ref_len": value}, 2))
    with pytest.raises(SaticError, match=rf"^{re.escape(str(path))}: 'ref_len' must be the number of reference "
                                         rf"sets, got {value}$"):
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


def many_ngrams_df() -> DocumentFrequency:
    """A table with every order and more n-grams of each than a small save slice."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    refs = [[[words[k] for k in rng.integers(0, 40, size=rng.integers(1, 9))] + ["0"] for _ in range(3)]
            for _ in range(30)]
    return DocumentFrequency.from_references(refs)


@pytest.mark.parametrize("save_slice", [1, 7, 1 << 16])
def test_save_writes_the_text_of_json_dumps_a_slice_at_a_time(tmp_path, monkeypatch, save_slice):
    df = many_ngrams_df()
    expected = json.dumps(df.to_json(), indent=None) + "\n"
    monkeypatch.setattr(document_frequency, "SAVE_SLICE", save_slice)
    monkeypatch.setattr(DocumentFrequency, "to_json", lambda self: pytest.fail("save built every n-gram as lists"))
    pieces = list(df.json_text())
    assert "".join(pieces) == expected
    if save_slice == 7:  # each piece holds at most one slice of n-grams (rows of ", "-separated lists)
        assert max(p.count("]") for p in pieces) <= save_slice + 2
    path = tmp_path / DEFAULT_FILENAME
    df.save(path)
    assert path.read_text() == expected
    loaded = DocumentFrequency.load(path)
    assert loaded.words == df.words and np.array_equal(loaded.keys, df.keys)
    assert np.array_equal(loaded.counts, df.counts)


def test_an_empty_table_saves_as_json_dumps_writes_it(tmp_path):
    df = DocumentFrequency(("a",), np.zeros(0, np.uint64), np.zeros(0, np.int64), 2)
    df.save(tmp_path / DEFAULT_FILENAME)
    assert (tmp_path / DEFAULT_FILENAME).read_text() == json.dumps(df.to_json(), indent=None) + "\n"


def test_from_references_counts_one_order_at_a_time(monkeypatch):
    """The occurrences of one order at most are in memory at once, and the counts are those of all orders
    counted together."""
    refs = [[c.split() for c in image] for image in (["a b c d e 0", "a b 0"], ["b c d 0"], ["e 0", "a b c 0"])]
    table: dict = {}
    ids, lengths = ngrams.encode([c for image in refs for c in image], table)
    doc_of_row = np.repeat(np.arange(len(refs)), [len(image) for image in refs])
    all_keys, all_counts = ngrams.document_counts(doc_of_row, *ngrams.ngram_occurrences(ids, lengths))
    sizes = []
    counts = ngrams.document_counts

    def recorded(doc, row, key):
        sizes.append((len(key), set(ngrams.key_order(key).tolist())))
        return counts(doc, row, key)

    monkeypatch.setattr(ngrams, "document_counts", recorded)
    df = DocumentFrequency.from_references(refs)
    assert [orders for _, orders in sizes] == [{1}, {2}, {3}, {4}]
    assert np.array_equal(df.keys, all_keys) and np.array_equal(df.counts, all_counts)
    assert dict(df.items()) == straightforward_df(refs)


def same_table(a: DocumentFrequency, b: DocumentFrequency) -> bool:
    return (a.words == b.words and a.num_ref_sets == b.num_ref_sets and np.array_equal(a.keys, b.keys)
            and np.array_equal(a.counts, b.counts))


@pytest.mark.parametrize("check_slice", [1, 3, 1 << 18])
def test_a_saved_file_loads_as_numbers_without_json_lists(tmp_path, monkeypatch, check_slice):
    monkeypatch.setattr(document_frequency, "CHECK_SLICE", check_slice)
    df = many_ngrams_df()
    path = tmp_path / DEFAULT_FILENAME
    df.save(path)
    by_json = DocumentFrequency._load_json(path)
    monkeypatch.setattr(DocumentFrequency, "_load_json", classmethod(lambda cls, p: pytest.fail("parsed as JSON")))
    loaded = DocumentFrequency.load(path)
    assert same_table(loaded, by_json) and same_table(loaded, df)



def test_one_set_and_empty_tables_load_as_numbers_without_json_lists(tmp_path, monkeypatch):
    """One reference set, and orders (or a whole table) without n-grams, are laid out as save() writes them too."""
    tables = [DocumentFrequency.from_references([[["a", "b"]]]),
              DocumentFrequency(("a",), np.zeros(0, np.uint64), np.zeros(0, np.int64), 3)]
    (tmp_path / "indented.json").write_text(json.dumps(tables[0].to_json(), indent=1))
    assert same_table(DocumentFrequency.load(tmp_path / "indented.json"), tables[0])
    monkeypatch.setattr(DocumentFrequency, "_load_json", classmethod(lambda cls, p: pytest.fail("parsed as JSON")))
    for k, df in enumerate(tables):
        df.save(tmp_path / f"{k}.json")
        assert same_table(DocumentFrequency.load(tmp_path / f"{k}.json"), df)

def reordered(data: dict) -> dict:
    """The same table with its 2-grams listed in reverse: valid, though not the order save() writes."""
    table = data["document_frequency"][1]
    table["ngrams"], table["counts"] = table["ngrams"][::-1], table["counts"][::-1]
    return data


def wrong_row_length(data: dict) -> dict:
    """A 2-gram table whose first two rows hold 3 and 1 words: as many numbers as 2 rows of 2."""
    table = data["document_frequency"][1]
    table["ngrams"][:2] = [table["ngrams"][0] + table["ngrams"][1][:1], table["ngrams"][1][1:]]
    return data


@pytest.mark.parametrize("change, indent, message", [
    (lambda d: d, 1, None),  # another layout of the same JSON
    (reordered, None, None),
    (wrong_row_length, None, "lists of 2 word indices"),
    (lambda d: {**d, "num_ref_sets": 0}, None, "num_ref_sets"),
    (lambda d: {**d, "words": d["words"][:1] * len(d["words"])}, None, "distinct"),
])
def test_other_text_is_read_as_json_with_its_checks(tmp_path, change, indent, message):
    df = many_ngrams_df()
    path = tmp_path / "other.json"
    path.write_text(json.dumps(change(df.to_json()), indent=indent) + "\n")
    if message is None:
        assert same_table(DocumentFrequency.load(path), df)
    else:
        with pytest.raises(SaticError, match=message):
            DocumentFrequency.load(path)


@pytest.mark.parametrize("old, new", [('"counts": [', '"counts": [0, '), ('"counts": [', '"counts": [1, '),
                                      ("]]", "]]]"), ('"n": 2', '"n": 3'), ("]}]}", "]}]} "), ("[[", "[[70000], ["),
                                      ("[[", "[[99999999999999999999], ["), ("], [", "],  ["), ("], [", "], [0"),
                                      (", [", ", [1, 2, 3], ["), ("1", "x")])
@pytest.mark.parametrize("check_slice", [3, 1 << 18])
def test_a_damaged_saved_file_is_refused_as_json_refuses_it(tmp_path, monkeypatch, old, new, check_slice):
    monkeypatch.setattr(document_frequency, "CHECK_SLICE", check_slice)
    df = many_ngrams_df()
    path = tmp_path / DEFAULT_FILENAME
    df.save(path)
    path.write_text(path.read_text().replace(old, new, 1))
    try:
        expected = DocumentFrequency._load_json(path)
    except SaticError as err:
        with pytest.raises(SaticError, match=re.escape(str(err))):
            DocumentFrequency.load(path)
    else:
        assert same_table(DocumentFrequency.load(path), expected)


def outcome(load, path):
    """What `load` gives: the table's fields, or the message it refuses the file with."""
    try:
        df = load(path)
    except SaticError as err:
        return str(err)
    return df.words, df.num_ref_sets, df.keys.tolist(), df.counts.tolist()


def test_every_one_character_change_to_a_saved_file_loads_as_json_reads_it(tmp_path):
    """Each character of a small saved table changed, dropped or doubled: the numbers read straight from the text
    are those of the JSON reading, or the file is refused with the JSON reading's message."""
    refs = [[["a", "b", "c", "d", "e", "0"]] for _ in range(12)] + [[["b", "c", "0"]]]
    df = DocumentFrequency.from_references(refs)
    path = tmp_path / DEFAULT_FILENAME
    df.save(path)
    text = path.read_text()
    start = text.index('"document_frequency"')  # the header is read as JSON
    differences = []
    for at in range(start, len(text)):
        for new in ("", text[at] * 2, "0", "9", " ", ",", "[", "]", "x"):
            changed = text[:at] + new + text[at + 1:]
            if changed == text:
                continue
            if DocumentFrequency._from_saved_text(changed) is None:  # read as JSON
                continue
            path.write_text(changed)
            if (read := outcome(DocumentFrequency.load, path)) != (expected := outcome(DocumentFrequency._load_json,
                                                                                      path)):
                differences.append((at, new, read, expected))
    assert differences == []


@pytest.mark.parametrize("old, new", [('"version": 1', '"version": 2'), ('"words": ["a", "b"', '"words": [1, "b"'),
                                      ('"format": "satic.cider_document_frequency"', '"format": "other"'),
                                      ('"words": ["a", "b", "0"]', '"words": 5'),
                                      ('"num_ref_sets": 2', '"num_ref_sets": 2.0'),
                                      ('"num_ref_sets": 2', '"num_ref_sets": 0'),
                                      ('"num_ref_sets": 2', '"num_ref_sets": -1')])
@pytest.mark.parametrize("empty", [False, True])
def test_a_saved_file_with_a_bad_header_is_refused_as_json_refuses_it(tmp_path, old, new, empty):
    df = DocumentFrequency.from_references([[["a", "b", "0"]], [["a", "0"]]])
    if empty:
        df = DocumentFrequency(df.words, np.zeros(0, np.uint64), np.zeros(0, np.int64), 2)
    path = tmp_path / DEFAULT_FILENAME
    df.save(path)
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    expected = outcome(DocumentFrequency._load_json, path)
    assert isinstance(expected, str) and str(path) in expected
    assert outcome(DocumentFrequency.load, path) == expected


@pytest.mark.parametrize("count", [2 ** 63, 9999999999999999999, 10 ** 30])
def test_a_count_beyond_int64_is_refused_by_name(tmp_path, count):
    """np.fromstring reads such a count as 2**63 - 1, and a count of JSON as too large for an array: the file is
    refused with its name whether its numbers are read from the text or as JSON, or from a reference pickle."""
    df = DocumentFrequency.from_references([[["a", "b", "0"]], [["a", "0"]]])
    path = tmp_path / DEFAULT_FILENAME
    df.save(path)
    data = json.loads(path.read_text())
    data["num_ref_sets"] = count
    data["document_frequency"][0]["counts"][0] = count
    for text in (json.dumps(data) + "\n", json.dumps(data, indent=1)):
        path.write_text(text)
        with pytest.raises(SaticError, match=f"^{re.escape(str(path))}: a count is too large"):
            DocumentFrequency.load(path)
    pickled = tmp_path / "coco-train-idxs.p"
    pickled.write_bytes(pickle.dumps({"document_frequency": {("a",): float(count)}, "ref_len": float(count)}))
    with pytest.raises(SaticError, match=f"^{re.escape(str(pickled))}: a count is too large"):
        load_reference_pickle(pickled)


@pytest.mark.parametrize("name, protocol", [("coco-train-idxs.p", 0), ("idxs.pkl", 1), ("idxs.pickle", 0),
                                            ("cached_tokens", 2), ("df.json", pickle.HIGHEST_PROTOCOL)])
def test_load_document_frequency_tells_the_reference_pickle_by_its_suffix_or_its_first_byte(tmp_path, name,
                                                                                             protocol):
    """Protocols 0 and 1 (Python 2's pickle.dump) begin with no marker byte: their .p or .pkl name tells them."""
    from satic.evaluation.document_frequency import load_document_frequency

    counts = defaultdict(float, {("a",): 2.0, ("b",): 1.0, ("a", "b"): 1.0})
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"document_frequency": counts, "ref_len": 2}, protocol))
    df = load_document_frequency(path)
    assert sorted(df.items()) == sorted(counts.items()) and df.num_ref_sets == 2
    df.save(tmp_path / DEFAULT_FILENAME)
    assert sorted(load_document_frequency(tmp_path / DEFAULT_FILENAME).items()) == sorted(counts.items())


def test_one_reference_set_and_captions_without_words():
    one = DocumentFrequency.from_references([[["a", "dog"], ["a"]]])
    assert (one.num_ref_sets, one.ref_len) == (1, 0.0)
    assert dict(one.items()) == {("a",): 1, ("dog",): 1, ("a", "dog"): 1}
    assert one.count(("dog", "a")) == 0 and one.count(("dog", "a", "dog")) == 0  # after every key: still unseen
    for empty in (DocumentFrequency.from_references([[[]], [[], []]]), DocumentFrequency.from_counts({}, 3)):
        assert (len(empty), empty.keys.tolist(), empty.counts.tolist(), list(empty.items())) == (0, [], [], [])


@pytest.mark.parametrize("counts, message", [
    ({("a",) * 5: 1}, r"n-gram \('a', 'a', 'a', 'a', 'a'\) is not a tuple of 1..4 words"),
    ({(): 1}, r"n-gram \(\) is not a tuple of 1..4 words"), ({"ab": 1}, r"n-gram 'ab' is not a tuple"),
    ({("a",): 1.5}, r"count 1.5 of \('a',\) is not a whole number"),
    ({("a",): -1}, r"count -1 of \('a',\) is not a whole number"), ({("a",): "1"}, "count '1'"),
    ({("a",): None}, r"count None of \('a',\) is not a whole number"),
    ({("a", 1): 1}, r"n-gram \('a', 1\) has a word that is not a string")])
def test_counts_that_are_not_of_ngrams_or_whole_numbers_are_refused(counts, message):
    with pytest.raises(SaticError, match=message):
        DocumentFrequency.from_counts(counts, 2)


def test_a_file_listing_an_ngram_twice_is_refused(tmp_path):
    data = DocumentFrequency.from_references(REFS).to_json()
    unigrams = data["document_frequency"][0]
    unigrams["ngrams"].append(unigrams["ngrams"][-1])
    unigrams["counts"].append(1)
    path = tmp_path / DEFAULT_FILENAME
    path.write_text(json.dumps(data))
    with pytest.raises(SaticError, match="an n-gram is listed twice"):
        DocumentFrequency.load(path)


def test_tables_without_reference_sets_or_with_unequal_columns_are_refused():
    keys, counts = np.array([1], np.uint64), np.array([1], np.int64)
    with pytest.raises(SaticError, match="need at least one reference set"):
        DocumentFrequency(("a",), keys, counts, 0)
    with pytest.raises(SaticError, match="keys and counts differ in length"):
        DocumentFrequency(("a",), keys, np.array([1, 1], np.int64), 1)
    with pytest.raises(SaticError, match="document frequency table has 65536 distinct words"):
        DocumentFrequency(tuple(f"w{i}" for i in range(65536)), keys, counts, 1)
    with pytest.raises(SaticError, match="need at least one reference set"):
        DocumentFrequency.from_references([])


def test_too_many_words_are_refused_by_the_source_named():
    words = [f"w{i}" for i in range(65536)]
    with pytest.raises(SaticError, match="reference corpus has 65536 distinct words"):
        DocumentFrequency.from_references([[words]])
    with pytest.raises(SaticError, match="coco-train-idxs.p has 65536 distinct words"):
        DocumentFrequency.from_counts({(w,): 1 for w in words}, 1, "coco-train-idxs.p")


def test_count_of_an_empty_or_too_long_ngram_is_zero():
    df = DocumentFrequency.from_references([[["a"] * 6]])
    assert df.count(("a",) * 4) == 1
    assert df.count(()) == 0 and df.count(("a",) * 5) == 0


def test_counts_above_the_number_of_reference_sets_are_refused():
    with pytest.raises(SaticError, match=r"counts: a count exceeds the number of reference sets \(2\)"):
        DocumentFrequency.from_counts({("a",): 3}, 2)
    assert DocumentFrequency.from_counts({("a",): 2}, 2).count(("a",)) == 2


def test_reference_pickles_of_integer_counts_are_read(tmp_path):
    """A defaultdict(int) names its int type: "__builtin__ int" as Python 2 pickles it, "builtins int" in Python 3,
    and "__builtin__ long" in Python 3 at protocol 2."""
    counts = defaultdict(int, {("a",): 2, ("a", "b"): 1})
    path = tmp_path / "coco-train-idxs.p"
    python3 = pickle.dumps({"document_frequency": counts, "ref_len": 2}, pickle.HIGHEST_PROTOCOL)
    protocol2 = pickle.dumps({"document_frequency": counts, "ref_len": 2}, 2)
    python2 = protocol2.replace(b"c__builtin__\nlong\n", b"c__builtin__\nint\n")
    assert b"builtins" in python3 and b"c__builtin__\nlong\n" in protocol2 and b"c__builtin__\nint\n" in python2
    for data in (python3, protocol2, python2):
        path.write_bytes(data)
        assert dict(load_reference_pickle(path).items()) == dict(counts)


@pytest.mark.parametrize("data, message", [
    ([1, 2], "expected a dict with 'document_frequency' and 'ref_len'"),
    ({"ref_len": 2}, "expected a dict with 'document_frequency' and 'ref_len'"),
    ({"document_frequency": [], "ref_len": 2}, "expected a dict with 'document_frequency' and 'ref_len'"),
    ({"document_frequency": {}}, "'ref_len' must be the number of reference sets, got None"),
    ({"document_frequency": {}, "ref_len": "2"}, "'ref_len' must be the number of reference sets, got '2'"),
    ({"document_frequency": {}, "ref_len": 0}, "'ref_len' must be the number of reference sets, got 0"),
    ({"document_frequency": {}, "ref_len": 2.5}, "'ref_len' must be the number of reference sets, got 2.5")])
def test_reference_pickles_without_counts_or_a_set_count_are_refused(tmp_path, data, message):
    path = tmp_path / "coco-train-idxs.p"
    path.write_bytes(pickle.dumps(data, 2))
    with pytest.raises(SaticError, match=f"^{re.escape(str(path))}: {re.escape(message)}$"):
        load_reference_pickle(path)


@pytest.mark.parametrize("table, message", [
    ({"n": 5, "ngrams": [], "counts": []}, "bad table for order 5"),
    ({"n": 0, "ngrams": [], "counts": []}, "bad table for order 0"),
    ({"n": 1, "ngrams": [[0]], "counts": [1, 1]}, "bad table for order 1"),
    ({"n": 1, "ngrams": [[0]], "counts": [0]}, "counts of order 1 must be positive integers"),
    ({"n": 1, "ngrams": [[0]], "counts": [1.5]}, "counts of order 1 must be positive integers"),
    ({"n": 1, "ngrams": [[0, 1]], "counts": [1]}, "n-grams of order 1 must be lists of 1 word indices"),
    ({"n": 1, "ngrams": [[0.0]], "counts": [1]}, "n-grams of order 1 must be lists of 1 word indices"),
    ({"n": 1, "ngrams": [[-1]], "counts": [1]}, "n-grams of order 1 must be lists of 1 word indices")])
def test_a_json_table_of_a_bad_order_or_bad_counts_is_refused(tmp_path, table, message):
    data = DocumentFrequency.from_references(REFS).to_json()
    data["document_frequency"][0] = table
    path = tmp_path / DEFAULT_FILENAME
    path.write_text(json.dumps(data))
    with pytest.raises(SaticError, match=f"^{re.escape(str(path))}: {message}; re-create it with `satic prepro`$"):
        DocumentFrequency.load(path)


def test_a_missing_file_is_named_as_a_document_frequency_file():
    from satic.evaluation.document_frequency import load_document_frequency

    with pytest.raises(SaticError, match="^CIDEr-D document frequency file not found: .*df.json$"):
        load_document_frequency("/nonexistent/df.json")
