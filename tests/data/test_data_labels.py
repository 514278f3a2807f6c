"""Label preprocessing must reproduce the reference's prepro_labels.py / prepro_ngrams.py exactly."""
import json
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from processes import default_sigint, killed_between_outputs_then_rerun, signalled_at_io_call, traced_env

from satic.cli import main as satic_main
from satic.data.labels import (LabelData, build_vocabulary, encode_captions, read_cocotalk, read_label_h5,
                               training_references, vocabulary_summary, word_counts, write_label_h5)
from satic.errors import SaticError
from satic.evaluation.document_frequency import DocumentFrequency
from satic.evaluation.results import find_references

# A hand-written Karpathy file: rare words, an over-long caption, restval, an entry without
# filename/cocoid. With threshold 1 and max length 5, the expected outputs are worked out by hand.
KARPATHY = {"images": [
    {"split": "train", "filepath": "train2014", "filename": "a.jpg", "cocoid": 11,
     "sentences": [{"tokens": ["a", "dog", "runs"]}, {"tokens": ["a", "cat", "sits", "on", "a", "mat"]}]},
    {"split": "restval", "filepath": "val2014", "filename": "b.jpg", "cocoid": 12,
     "sentences": [{"tokens": ["the", "dog", "sits"]},
                   {"tokens": ["a", "zebra", "runs", "fast", "and", "far", "away", "from", "the", "big", "dog"]}]},
    {"split": "val", "filepath": "val2014", "filename": "c.jpg", "cocoid": 13,
     "sentences": [{"tokens": ["a", "dog"], "raw": "A dog."}]},
    {"split": "test", "sentences": [{"tokens": ["a", "cat", "runs"]}]},
]}
WORDS = ("a", "dog", "runs", "cat", "sits", "the", "UNK")  # first appearance; UNK last
LABELS = [[1, 2, 3, 0, 0], [1, 4, 5, 7, 1], [6, 2, 5, 0, 0], [1, 7, 3, 7, 7], [1, 2, 0, 0, 0], [1, 4, 3, 0, 0]]


@pytest.fixture
def karpathy(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(KARPATHY))
    return path


def test_vocabulary_order_threshold_and_unk():
    vocab = build_vocabulary(KARPATHY["images"], word_count_threshold=1)
    assert vocab.words == WORDS
    # nothing dropped -> no UNK
    assert "UNK" not in build_vocabulary(KARPATHY["images"], word_count_threshold=0).words
    counts = word_counts(KARPATHY["images"])
    assert vocabulary_summary(counts, 0) == ("vocabulary: 15 words seen more than 0 times (--word-count-threshold); "
                                             "no UNK")
    assert vocabulary_summary({"a": 3000, "dog": 2, "cat": 1}, 2) == (
        "vocabulary: 1 word seen more than 2 times (--word-count-threshold), and UNK for 2 rarer words: 3 of the 3,003 "
        "words written in the captions (0.1%)")


def test_encode_captions_cut_pad_and_indices():
    vocab = build_vocabulary(KARPATHY["images"], 1)
    data = encode_captions(KARPATHY["images"], vocab, max_length=5)
    assert data.labels.dtype == np.uint32
    np.testing.assert_array_equal(data.labels, LABELS)
    np.testing.assert_array_equal(data.label_length, [3, 5, 3, 5, 2, 3])
    np.testing.assert_array_equal(data.label_start_ix, [1, 3, 5, 6])
    np.testing.assert_array_equal(data.label_end_ix, [2, 4, 5, 6])


def test_prepro_command_writes_reference_files(karpathy, tmp_path, capsys):
    out = tmp_path / "out"
    assert satic_main(["prepro", "--karpathy", str(karpathy), "--out", str(out),
                       "--word-count-threshold", "1", "--max-length", "5"]) == 0
    assert capsys.readouterr().out == (
        "vocabulary: 6 words seen more than 1 time (--word-count-threshold), and UNK for 9 rarer words: 9 of the 28 "
        "words written in the captions (32.1%)\n") + "".join(f"wrote {out / name}\n" for name in (
            "cocotalk.json", "cocotalk_label.h5", "cider_df.json", "references.json"))
    info = json.loads((out / "cocotalk.json").read_text())
    assert info["ix_to_word"] == {str(i): w for i, w in enumerate(WORDS, start=1)}
    assert info["images"] == [
        {"split": "train", "file_path": "train2014/a.jpg", "id": 11},
        {"split": "restval", "file_path": "val2014/b.jpg", "id": 12},
        {"split": "val", "file_path": "val2014/c.jpg", "id": 13},
        {"split": "test"},
    ]
    with h5py.File(out / "cocotalk_label.h5", "r") as f:
        assert sorted(f) == ["label_end_ix", "label_length", "label_start_ix", "labels"]
        assert all(f[k].dtype == np.uint32 for k in f)
        np.testing.assert_array_equal(f["labels"][()], LABELS)
    vocab, images = read_cocotalk(out / "cocotalk.json")
    assert vocab.words == WORDS and len(images) == 4
    # the raw captions of the val and test images with a cocoid, which validation and eval score against
    assert json.loads((out / "references.json").read_text())["annotations"] == [
        {"image_id": 13, "id": 0, "caption": "A dog."}]
    assert find_references(out, [13]) == (out / "references.json", {13: ["A dog."]})
    assert find_references(out, [11]) is None  # training images: not there

    # CIDEr-D statistics: train + restval only, full (uncut) captions as word indices plus "0"
    refs = [[["1", "2", "3", "0"], ["1", "4", "5", "7", "1", "7", "0"]],
            [["6", "2", "5", "0"], ["1", "7", "3", "7", "7", "7", "7", "7", "6", "7", "2", "0"]]]
    assert training_references(KARPATHY["images"], vocab) == refs
    df = DocumentFrequency.load(out / "cider_df.json")
    assert df.to_json() == DocumentFrequency.from_references(refs).to_json()
    assert df.num_ref_sets == 2
    assert (df.count(["7"]), df.count(["3", "0"]), df.count(["2", "0"]), df.count(["4"])) == (2, 1, 1, 1)


def test_prepro_converts_a_reference_pickle(karpathy, tmp_path):
    """prepro_ngrams.py's pickle: per n-gram (a tuple of index strings), the number of images having it."""
    import pickle
    from collections import defaultdict

    vocab = build_vocabulary(KARPATHY["images"], 1)
    refs = training_references(KARPATHY["images"], vocab)
    counts = defaultdict(float)
    for captions in refs:
        grams = {tuple(c[i:i + n]) for c in captions for n in range(1, 5) for i in range(len(c) - n + 1)}
        for gram in grams:
            counts[gram] += 1
    (tmp_path / "coco-train-idxs.p").write_bytes(pickle.dumps({"document_frequency": counts, "ref_len": 2}, 2))
    assert satic_main(["prepro", "--karpathy", str(karpathy), "--out", str(tmp_path / "o"), "--word-count-threshold",
                       "1", "--max-length", "5", "--cider-df-from", str(tmp_path / "coco-train-idxs.p")]) == 0
    df = DocumentFrequency.load(tmp_path / "o" / "cider_df.json")
    expected = DocumentFrequency.from_references(refs)
    assert sorted(df.items()) == sorted(expected.items()) and df.num_ref_sets == 2


def test_prepro_records_image_sizes(karpathy, tmp_path):
    from PIL import Image

    for name, size in (("train2014/a.jpg", (30, 20)), ("val2014/b.jpg", (8, 9)), ("val2014/c.jpg", (5, 6))):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", size).save(tmp_path / name)
    data = json.loads(karpathy.read_text())
    data["images"] = data["images"][:3]
    karpathy.write_text(json.dumps(data))
    assert satic_main(["prepro", "--karpathy", str(karpathy), "--out", str(tmp_path / "o"),
                       "--images-root", str(tmp_path), "--word-count-threshold", "0"]) == 0
    _, images = read_cocotalk(tmp_path / "o" / "cocotalk.json")
    assert [(i["width"], i["height"]) for i in images] == [(30, 20), (8, 9), (5, 6)]


def test_label_h5_round_trip(tmp_path):
    vocab = build_vocabulary(KARPATHY["images"], 1)
    data = encode_captions(KARPATHY["images"], vocab, 5)
    write_label_h5(tmp_path / "l.h5", data)
    back = read_label_h5(tmp_path / "l.h5")
    for name in ("labels", "label_start_ix", "label_end_ix", "label_length"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    np.testing.assert_array_equal(back.captions(1), [LABELS[2], LABELS[3]])


@pytest.mark.parametrize("name, values, message", [
    ("labels", lambda a: a.astype(np.float64) + 0.5, "labels holds dtype float64"),
    ("labels", lambda a: np.where(a == 1, np.nan, a), "labels holds dtype float64"),
    ("labels", lambda a: a.astype(np.int64) - 1, "labels holds a negative number"),
    ("labels", lambda a: np.full(a.shape, b"x"), "labels holds dtype |S1"),
    ("label_start_ix", lambda a: np.full(a.shape, b"x"), "label_start_ix holds dtype |S1"),
    ("label_length", lambda a: a.astype(bool), "label_length holds dtype bool"),
])
def test_a_label_file_of_other_numbers_than_indices_is_refused(tmp_path, name, values, message):
    """A float (NaN), string or negative word index is refused naming the file and field, not a ValueError."""
    vocab = build_vocabulary(KARPATHY["images"], 1)
    write_label_h5(tmp_path / "l.h5", encode_captions(KARPATHY["images"], vocab, 5))
    with h5py.File(tmp_path / "l.h5", "a") as f:
        changed = values(f[name][()])
        del f[name]
        f[name] = changed
    with pytest.raises(SaticError, match=f"l.h5: {message}, not word or row indices"):
        read_label_h5(tmp_path / "l.h5")


def _heap_signature_damaged(path):
    """The root group's local heap (where the names of its datasets are) with its signature overwritten."""
    raw = path.read_bytes()
    assert raw.count(b"HEAP") == 1
    path.write_bytes(raw.replace(b"HEAP", b"XXXX"))


def _labels_replaced(path, make):
    with h5py.File(path, "a") as f:
        del f["labels"]
        make(f)


@pytest.mark.parametrize("damage, message", [
    (_heap_signature_damaged, r"cannot read it \(RuntimeError: .*bad local heap signature.*\); the file is damaged: "
                              r"copy it again, or re-create it with `satic prepro`$"),
    (lambda p: _labels_replaced(p, lambda f: f.__setitem__("labels", h5py.SoftLink("/gone"))),
     r"cannot read it \(KeyError: .*\); the file is damaged"),
    (lambda p: _labels_replaced(p, lambda f: f.create_group("labels")), "labels is a group, not an array"),
    (lambda p: _labels_replaced(p, lambda f: f.create_dataset("labels", data=h5py.Empty("uint32"))),
     r"labels is an empty dataset \(no shape\), not an array"),
    (lambda p: _labels_replaced(p, lambda f: f.create_dataset("labels", data=np.zeros((6, 0), np.uint32))),
     r"labels has no columns \(shape \(6, 0\)\), so no caption has a word"),
], ids=["damaged", "dangling-link", "group", "no-shape", "no-columns"])
def test_a_damaged_label_file_or_one_of_other_objects_is_refused_by_name(tmp_path, damage, message):
    """What h5py raises for a damaged file (RuntimeError, KeyError), a group, a dataset of no shape or rows of no
    words where the label rows belong: one message naming the file, not a traceback."""
    vocab = build_vocabulary(KARPATHY["images"], 1)
    write_label_h5(tmp_path / "l.h5", encode_captions(KARPATHY["images"], vocab, 5))
    damage(tmp_path / "l.h5")
    with pytest.raises(SaticError, match=f"label file {tmp_path / 'l.h5'}: {message}"):
        read_label_h5(tmp_path / "l.h5")


def test_caption_ranges_of_another_shape_than_one_per_image_are_refused(tmp_path):
    """label_start_ix and label_end_ix as (N, 1) columns: refused, not a TypeError when a batch reads them."""
    vocab = build_vocabulary(KARPATHY["images"], 1)
    data = encode_captions(KARPATHY["images"], vocab, 5)
    write_label_h5(tmp_path / "l.h5", data)
    with h5py.File(tmp_path / "l.h5", "a") as f:
        for name in ("label_start_ix", "label_end_ix"):
            del f[name]
            f[name] = getattr(data, name).reshape(-1, 1)
    with pytest.raises(SaticError, match="l.h5: label_start_ix and label_end_ix must be \\(num_images,\\) alike"):
        read_label_h5(tmp_path / "l.h5")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][1].update(sentences=[]), "has no captions"),
    (lambda d: d["images"][0]["sentences"][1].update(tokens=[]), "is empty"),
    (lambda d: d["images"][0]["sentences"][1].update(tokens=["a", "hot dog"]),
     r"images\[0\] \(a.jpg\) sentence 1 has the token 'hot dog', not one word without spaces; split it into words"),
    (lambda d: d["images"][1]["sentences"][0].update(tokens=["a", ""]), r"sentence 0 has the token '', not one word"),
    (lambda d: d["images"][1]["sentences"][0].update(tokens=["\ud800"]),
     r"has the token '\\ud800', which is not valid Unicode text \(a lone surrogate\)"),
    (lambda d: d["images"][0]["sentences"][0].pop("tokens"), "needs a 'tokens' list"),
    (lambda d: d["images"][2].pop("split"), "needs 'split'"),
    (lambda d: d.update(images=[]), "non-empty 'images'"),
    (lambda d: d.update(images=[{"id": 1, "file_name": "a.jpg"}], annotations=[{"image_id": 1, "caption": "A dog."}]),
     r"bad.json is a COCO captions file \(images and annotations\); satic prepro reads a Karpathy split file: "),
    (lambda d: [img.update(split="val") for img in d["images"]], "no train or restval"),
    (lambda d: d["images"][2].update(cocoid=11),
     r"images\[0\] \(a.jpg\) and images\[2\] \(c.jpg\) both have cocoid 11; give every image its own"),
    (lambda d: d["images"][1].update(cocoid=[12]), r"images\[1\] has cocoid \[12\]; a cocoid is an integer"),
    (lambda d: d["images"][1].update(cocoid=1.5), r"images\[1\] has cocoid 1.5; a cocoid is an integer"),
    (lambda d: d["images"][2].update(cocoid="11"), r"images\[0\] \(a.jpg\) and images\[2\] \(c.jpg\) have cocoid 11 "
     r"and cocoid '11', one id for features and results; give every image its own cocoid"),
    (lambda d: d["images"][2].update(cocoid="011"), r"images\[0\] \(a.jpg\) and images\[2\] \(c.jpg\) have cocoid "
     r"11 and cocoid '011', one id for features and results"),
    (lambda d: d["images"][1].update(filepath=2014), r"images\[1\] \(b.jpg\) has filepath 2014; a filepath is a "
     "string"),
    (lambda d: d["images"][2].update(split="vall"),
     r"images\[2\] \(c.jpg\) has split 'vall'; a Karpathy split is one of \['train', 'restval', 'val', 'test'\]"),
])
def test_bad_karpathy_files(tmp_path, change, message):
    data = json.loads(json.dumps(KARPATHY))
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SaticError, match=message):
        from satic.data.labels import prepare_labels
        prepare_labels(path, tmp_path / "out", word_count_threshold=1)
    assert not (tmp_path / "out" / "cocotalk_label.h5").exists()


def test_a_threshold_that_keeps_no_word_is_refused(karpathy, tmp_path, capsys):
    """The reference would write a vocabulary of UNK alone, and every caption would become UNKs."""
    assert build_vocabulary(KARPATHY["images"], 5).words == ("a", "UNK")
    args = ["prepro", "--karpathy", str(karpathy), "--out", str(tmp_path / "out"), "--word-count-threshold", "6"]
    assert satic_main(args) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--word-count-threshold 6 keeps no word (the most frequent appears 6 times); give a smaller threshold")
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_inputs(tmp_path):
    with pytest.raises(SaticError, match="not found"):
        read_label_h5(tmp_path / "nope.h5")
    (tmp_path / "corrupt.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(SaticError, match="corrupt.h5.*not a readable HDF5"):
        read_label_h5(tmp_path / "corrupt.h5")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SaticError, match="not valid JSON"):
        read_cocotalk(tmp_path / "bad.json")
    bad = LabelData(np.zeros((2, 3), np.uint32), np.array([1, 2], np.uint32), np.array([1, 3], np.uint32),
                    np.ones(2, np.uint32))
    write_label_h5(tmp_path / "idx.h5", bad)
    with pytest.raises(SaticError, match="start <= end <= 2"):
        read_label_h5(tmp_path / "idx.h5")
    assert satic_main(["prepro", "--karpathy", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2


def test_prepro_refuses_one_cocoid_for_two_images_naming_both(tmp_path, capsys):
    data = json.loads(json.dumps(KARPATHY))
    data["images"][3].update(filename="d.jpg", cocoid=12)  # the test image would share restval b.jpg's id
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    assert satic_main(["prepro", "--karpathy", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "images[1] (b.jpg) and images[3] (d.jpg) both have cocoid 12" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prepro_refuses_a_filename_that_is_not_text_naming_the_image(tmp_path, capsys):
    data = json.loads(json.dumps(KARPATHY))
    data["images"][2]["filename"] = None
    path = tmp_path / "null.json"
    path.write_text(json.dumps(data))
    assert satic_main(["prepro", "--karpathy", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"satic prepro: error: {path}: images[2] (13) has filename null; a filename is a string (the image file's "
        'folder and name, as in "filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg")\n')
    assert not (tmp_path / "out").exists()


def test_prepro_replaces_an_earlier_run_only_with_overwrite(karpathy, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prepro", "--karpathy", str(karpathy), "--out", str(out), "--word-count-threshold", "1"]
    assert satic_main(argv) == 0
    (out / "notes.txt").write_text("mine")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert satic_main([*argv[:-1], "2"]) == 2
    err = capsys.readouterr().err
    assert (f"output directory {out} already holds cocotalk.json, cocotalk_label.h5, cider_df.json, references.json; "
            "give another directory, or pass --overwrite to replace them") in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first

    assert satic_main([*argv[:-1], "2", "--overwrite"]) == 0  # a higher threshold: fewer words
    vocab, _ = read_cocotalk(out / "cocotalk.json")
    assert len(vocab.words) < len(WORDS) and (out / "notes.txt").read_text() == "mine"
    # a dataset without val/test images has no references.json; the earlier one's would be taken for its own
    karpathy.write_text(json.dumps({"images": KARPATHY["images"][:2]}))
    assert satic_main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cider_df.json", "cocotalk.json", "cocotalk_label.h5",
                                                     "notes.txt"]


def test_a_failed_prepro_leaves_the_output_folder_as_it_was(karpathy, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prepro", "--karpathy", str(karpathy), "--out", str(out)]
    assert satic_main([*argv, "--images-root", str(tmp_path / "nowhere")]) == 2
    assert "--images-root" in capsys.readouterr().err and not out.exists()  # checked before any output
    assert satic_main([*argv, "--images-root", str(tmp_path)]) == 2  # the folder lacks the images
    assert "check --images-root" in capsys.readouterr().err and not out.exists()
    assert satic_main([*argv, "--word-count-threshold", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "references.json").unlink()
    (out / "references.json").mkdir()  # the last output cannot be written: the earlier ones must not be either
    assert satic_main([*argv, "--word-count-threshold", "2", "--overwrite"]) == 2
    assert "references.json is a directory" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == {name: data for name, data in before.items() if name != "references.json"}


# The reference's prepro_labels.py defaults: words seen more than 5 times, captions cut at 16 words.
DEFAULTS_KARPATHY = {"images": [
    {"split": "train", "cocoid": 1, "sentences": [{"tokens": ["y", "y", "y", "x", "x"]},
                                                  {"tokens": ["y", "y", "y", "x", "x", "x"]}]},
    {"split": "restval", "cocoid": 2, "sentences": [{"tokens": ["z"] * 18}]},
]}  # x 5 times (dropped), y 6 times (kept), z 18 times in one caption (kept, cut)
DEFAULT_LABELS = [[1, 1, 1, 3, 3] + [0] * 11, [1, 1, 1, 3, 3, 3] + [0] * 10, [2] * 16]


def test_defaults_are_the_references_threshold_5_and_length_16(tmp_path):
    from satic.data.labels import prepare_labels

    images = DEFAULTS_KARPATHY["images"]
    vocab = build_vocabulary(images)
    assert vocab.words == ("y", "z", "UNK")
    data = encode_captions(images, vocab)
    np.testing.assert_array_equal(data.labels, DEFAULT_LABELS)
    np.testing.assert_array_equal(data.label_length, [5, 6, 16])
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(DEFAULTS_KARPATHY))
    prepare_labels(path, tmp_path / "api")
    assert satic_main(["prepro", "--karpathy", str(path), "--out", str(tmp_path / "cli")]) == 0
    for out in (tmp_path / "api", tmp_path / "cli"):
        assert read_cocotalk(out / "cocotalk.json")[0].words == ("y", "z", "UNK")
        np.testing.assert_array_equal(read_label_h5(out / "cocotalk_label.h5").labels, DEFAULT_LABELS)


# Inputs on which the reference's prepro_labels.py / prepro_ngrams.py write something particular; the
# expected values are the reference scripts' own outputs for these inputs.

def _prepro(tmp_path, images, threshold):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    out = tmp_path / "out"
    assert satic_main(["prepro", "--karpathy", str(path), "--out", str(out), "--word-count-threshold",
                       str(threshold)]) == 0
    return out


def test_an_image_without_cocoid_takes_its_imgid_as_the_reference(tmp_path, capsys):
    """Flickr8k/30k Karpathy files have imgid and no cocoid: the reference writes 'id' = imgid. An image with
    neither is kept without an id, as there, and named: nothing can find its features."""
    images = [{"split": "train", "filename": "1000.jpg", "imgid": 0, "sentences": [{"tokens": ["a", "dog"]}]},
              {"split": "val", "filename": "1001.jpg", "imgid": 1, "sentences": [{"tokens": ["a"], "raw": "A."}]},
              {"split": "test", "filename": "1002.jpg", "cocoid": 7, "imgid": 2, "sentences": [{"tokens": ["a"]}]},
              {"split": "test", "filename": "1003.jpg", "sentences": [{"tokens": ["dog"]}]}]
    out = _prepro(tmp_path, images, 0)
    assert read_cocotalk(out / "cocotalk.json")[1] == [
        {"split": "train", "file_path": "1000.jpg", "id": 0}, {"split": "val", "file_path": "1001.jpg", "id": 1},
        {"split": "test", "file_path": "1002.jpg", "id": 7}, {"split": "test", "file_path": "1003.jpg"}]
    assert "warning: " + str(tmp_path / "dataset.json") + ": 1 of the 4 images (1003.jpg) have neither 'cocoid' nor " \
        "'imgid', so satic train and eval cannot find their features" in capsys.readouterr().err
    assert find_references(out, [1, 7]) == (out / "references.json", {1: ["A."], 7: ["a"]})


def test_an_imgid_equal_to_another_images_cocoid_is_refused(tmp_path):
    from satic.data.labels import prepare_labels

    images = [{"split": "train", "filename": "a.jpg", "cocoid": 5, "sentences": [{"tokens": ["a"]}]},
              {"split": "train", "filename": "b.jpg", "imgid": 5, "sentences": [{"tokens": ["a"]}]}]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(SaticError, match=r"images\[0\] \(a.jpg\) and images\[1\] \(b.jpg\) have cocoid and imgid 5"):
        prepare_labels(path, tmp_path / "out", word_count_threshold=0)


def test_a_literal_eos_token_is_the_end_token_in_the_cider_references(tmp_path):
    """prepro_ngrams.py sets wtoi['<eos>'] = 0 over the vocabulary, so a caption token '<eos>' counts as "0"
    in the document frequencies (kept in the vocabulary or not); the label file keeps its word index."""
    images = [{"split": "train", "cocoid": 1, "sentences": [{"tokens": ["a", "<eos>"]}]}]
    vocab = build_vocabulary(images, 0)
    assert vocab.words == ("a", "<eos>")
    assert training_references(images, vocab) == [[["1", "0", "0"]]]
    np.testing.assert_array_equal(encode_captions(images, vocab, 3).labels, [[1, 2, 0]])
    rare = [{"split": "train", "cocoid": 1, "sentences": [{"tokens": ["a", "a", "<eos>"]}]}]
    assert training_references(rare, build_vocabulary(rare, 1)) == [[["1", "1", "0", "0"]]]
    df = DocumentFrequency.load(_prepro(tmp_path, images, 0) / "cider_df.json")
    assert dict(df.items()) == {("1",): 1, ("0",): 1, ("1", "0"): 1, ("0", "0"): 1, ("1", "0", "0"): 1}


def test_a_frequent_literal_unk_token_is_listed_twice_as_the_reference(tmp_path):
    """Captions that use 'UNK' more than the threshold while a rarer word is dropped: the reference keeps 'UNK'
    as a word and appends 'UNK' again; its wtoi (and so every label) uses the last one."""
    images = [{"split": "train", "cocoid": 1, "sentences": [{"tokens": ["UNK", "UNK", "b"]}]}]
    vocab = build_vocabulary(images, 1)
    assert vocab.words == ("UNK", "UNK") and vocab.unk_index == 2 and vocab.index("UNK") == 2
    out = _prepro(tmp_path, images, 1)
    assert json.loads((out / "cocotalk.json").read_text())["ix_to_word"] == {"1": "UNK", "2": "UNK"}
    assert read_cocotalk(out / "cocotalk.json")[0] == vocab
    np.testing.assert_array_equal(read_label_h5(out / "cocotalk_label.h5").labels[:, :4], [[2, 2, 2, 0]])
    assert training_references(images, vocab) == [[["2", "2", "2", "0"]]]


def test_a_label_file_without_label_length_is_read_as_the_reference_loader_reads_it(tmp_path):
    """The reference's loaders never read label_length: a label file without it gives each row's word count."""
    data = encode_captions(KARPATHY["images"], build_vocabulary(KARPATHY["images"], 1), 5)
    with h5py.File(tmp_path / "l.h5", "w") as f:
        for name in ("labels", "label_start_ix", "label_end_ix"):
            f.create_dataset(name, data=getattr(data, name).astype(np.int64))
    back = read_label_h5(tmp_path / "l.h5")
    np.testing.assert_array_equal(back.label_length, data.label_length)
    np.testing.assert_array_equal(back.captions(1), [LABELS[2], LABELS[3]])


def test_cider_references_share_one_string_per_word_index():
    """COCO's 566k training captions hold millions of tokens: each index's string exists once, not once a token."""
    vocab = build_vocabulary(KARPATHY["images"], 1)
    refs = training_references(KARPATHY["images"], vocab)
    tokens = [t for image in refs for caption in image for t in caption]
    assert len({id(t) for t in tokens}) == len(set(tokens))
    assert refs[0][0][:2] == [str(vocab.encode(["a"])[0]), str(vocab.encode(["dog"])[0])]


@pytest.mark.parametrize("with_length", [False, True])
@pytest.mark.parametrize("labels", [np.int64(3), np.array([1, 2, 0], np.int64)])
def test_a_label_file_whose_labels_are_not_rows_is_refused_by_name(tmp_path, labels, with_length):
    """A single number or one row of words where the (M, L) label rows belong, with or without label_length."""
    with h5py.File(tmp_path / "l.h5", "w") as f:
        f.create_dataset("labels", data=labels)
        f.create_dataset("label_start_ix", data=np.array([1], np.int64))
        f.create_dataset("label_end_ix", data=np.array([1], np.int64))
        if with_length:
            f.create_dataset("label_length", data=np.array([2], np.int64))
    with pytest.raises(SaticError, match=r"l\.h5: labels must be \(M, L\) and label_length \(M,\)"):
        read_label_h5(tmp_path / "l.h5")


def test_a_karpathy_file_with_annotations_besides_its_sentences_is_read_as_a_karpathy_file(tmp_path):
    """Only a file none of whose images has sentences is taken for COCO's captions file; in a Karpathy file that
    also has an annotations list, an image without sentences is named."""
    from satic.data.labels import karpathy_images

    data = json.loads(json.dumps(KARPATHY))
    data["annotations"] = [{"image_id": 11, "caption": "A dog runs."}]
    (tmp_path / "k.json").write_text(json.dumps(data))
    assert [img["split"] for img in karpathy_images(tmp_path / "k.json")] == ["train", "restval", "val", "test"]
    del data["images"][1]["sentences"]
    (tmp_path / "k.json").write_text(json.dumps(data))
    with pytest.raises(SaticError, match=r"images\[1\] needs 'split' and a 'sentences' list"):
        karpathy_images(tmp_path / "k.json")


def test_the_label_file_holds_the_bytes_h5py_writes_to_a_file(tmp_path):
    """Made in memory (a full disk must never reach HDF5), the label file is still byte for byte the one the
    reference's prepro writes through h5py to a file, at a size where HDF5 allocates in several blocks."""
    import h5py

    from satic.data.labels import H5_FIELDS, LabelData, write_label_h5

    rng = np.random.default_rng(0)
    images, rows = 3000, 15000
    start = np.arange(1, rows + 1, 5, dtype=np.uint32)
    data = LabelData(rng.integers(0, 9000, (rows, 16)).astype(np.uint32), start, start + 4,
                     rng.integers(1, 17, rows).astype(np.uint32))
    assert len(start) == images
    with h5py.File(tmp_path / "direct.h5", "w") as f:
        for name in H5_FIELDS:
            f.create_dataset(name, dtype="uint32", data=getattr(data, name))
    write_label_h5(tmp_path / "ours.h5", data)
    assert (tmp_path / "ours.h5").read_bytes() == (tmp_path / "direct.h5").read_bytes()


def test_a_caption_of_one_word_is_the_shortest_cut():
    """--max-length 1 keeps each caption's first word; 0 keeps nothing and is refused by name."""
    vocab = build_vocabulary(KARPATHY["images"], 1)
    data = encode_captions(KARPATHY["images"], vocab, max_length=1)
    np.testing.assert_array_equal(data.labels, [[row[0]] for row in LABELS])
    np.testing.assert_array_equal(data.label_length, [1] * 6)
    assert (data.seq_length, data.num_images) == (1, 4)
    with pytest.raises(SaticError, match="^--max-length must be at least 1, got 0$"):
        encode_captions(KARPATHY["images"], vocab, max_length=0)


@pytest.mark.parametrize("content, message", [
    ({"images": []}, "expected 'ix_to_word' and 'images'"),
    ({"ix_to_word": {"1": "a"}}, "expected 'ix_to_word' and 'images'"),
    ({"ix_to_word": {"1": "a"}, "images": {}}, "expected 'ix_to_word' and 'images'"),
    ([], "expected 'ix_to_word' and 'images'"),
    ({"ix_to_word": {"1": "a"}, "images": [{"split": "val"}, {"id": 3, "file_path": "a.jpg"}]},
     r"images\[1\] has no 'split'"),
    ({"ix_to_word": {"1": "a"}, "images": ["a.jpg"]}, r"images\[0\] has no 'split'"),
    ({"ix_to_word": {"1": "a"}, "images": [{"split": "val", "id": 1}, {"split": ["train"], "id": 2}]},
     r'images\[1\] has split \["train"\]; a split is a string such as "train" \(one of \[.train., .restval., .val., '
     r".test.\]\)"),
    ({"ix_to_word": {"1": "a"}, "images": [{"split": None, "id": 1}]},
     r'images\[0\] has split null; a split is a string such as "train" \(one of \[.+\]\)'),
])
def test_an_info_file_without_its_fields_is_refused_naming_the_fix(tmp_path, content, message):
    (tmp_path / "cocotalk.json").write_text(json.dumps(content))
    with pytest.raises(SaticError, match=f"cocotalk.json: {message}; re-create it with `satic prepro`$"):
        read_cocotalk(tmp_path / "cocotalk.json")


def test_writing_the_label_file_leaves_the_working_folder_alone(tmp_path, monkeypatch):
    """The file is made in memory under the output's name: a file of that name in the working folder (such as
    another dataset's, when prepro runs from its folder) is neither replaced nor made."""
    data = encode_captions(KARPATHY["images"], build_vocabulary(KARPATHY["images"], 1), 5)
    (tmp_path / "here").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    write_label_h5(tmp_path / "out" / "l.h5", data)
    assert list((tmp_path / "here").iterdir()) == []
    (tmp_path / "here" / "cocotalk_label.h5").write_bytes(b"mine")
    write_label_h5(tmp_path / "out" / "cocotalk_label.h5", data)
    assert [p.name for p in (tmp_path / "here").iterdir()] == ["cocotalk_label.h5"]
    assert (tmp_path / "here" / "cocotalk_label.h5").read_bytes() == b"mine"
    np.testing.assert_array_equal(read_label_h5(tmp_path / "out" / "cocotalk_label.h5").labels, LABELS)


def test_labels_fit_a_vocabulary_that_has_their_largest_word_index(tmp_path):
    """Word indices run 1..vocab_size (the last one UNK here): a label file using the last word fits, one with a
    word past the vocabulary or captions for another number of images is refused naming both files."""
    from satic.data.labels import check_labels_match

    data = encode_captions(KARPATHY["images"], build_vocabulary(KARPATHY["images"], 1), 5)
    images = [{"split": img["split"]} for img in KARPATHY["images"]]
    assert int(data.labels.max()) == len(WORDS) == 7
    check_labels_match(data, images, 7, "l.h5", "info.json")
    with pytest.raises(SaticError, match="^l.h5 uses word index 7 but info.json has 6 words; use labels and a "
                                         "vocabulary made by the same `satic prepro` run"):
        check_labels_match(data, images, 6, "l.h5", "info.json")
    with pytest.raises(SaticError, match="^l.h5 has captions for 4 images but info.json lists 3; use files made "
                                         "by the same `satic prepro` run$"):
        check_labels_match(data, images[:3], 7, "l.h5", "info.json")


def test_prepare_labels_keeps_an_earlier_run_unless_told_to_overwrite(karpathy, tmp_path):
    from satic.data.labels import prepare_labels

    karpathy.write_text(json.dumps({"images": KARPATHY["images"][:3]}))  # every image with an id: no warning
    prepare_labels(karpathy, tmp_path / "out", word_count_threshold=1)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SaticError, match="already holds cocotalk.json, cocotalk_label.h5, cider_df.json, "
                                         "references.json"):
        prepare_labels(karpathy, tmp_path / "out", word_count_threshold=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first
    prepare_labels(karpathy, tmp_path / "out", word_count_threshold=2, overwrite=True)
    assert read_cocotalk(tmp_path / "out" / "cocotalk.json")[0].words != WORDS


def test_the_warning_about_images_without_an_id_names_the_caller(karpathy, tmp_path):
    """Its file and line are the code that called prepare_labels (satic prepro's), not the library's."""
    from satic.data.labels import prepare_labels

    with pytest.warns(UserWarning, match="1 of the 4 images") as caught:
        prepare_labels(karpathy, tmp_path / "out", word_count_threshold=1)
    assert [w.filename for w in caught] == [__file__]


def test_a_prepro_killed_between_its_outputs_is_finished_by_the_same_command(karpathy, tmp_path):
    """SIGKILL once the first of its files is in place: the same command, without --overwrite, replaces it and
    writes what an uninterrupted run writes."""
    args = ["prepro", "--karpathy", str(karpathy), "--word-count-threshold", "0"]
    assert satic_main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    killed_between_outputs_then_rerun(args, out)
    whole = tmp_path / "whole"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", [("publish", False), ("write_json", True)],
                         ids=["as-the-first-output-is-put-in-place", "once-the-unfinished-marker-is-written"])
def test_a_prepro_stopped_while_writing_leaves_no_folder_it_made(karpathy, tmp_path, sig, where):
    """Ctrl-C or SIGTERM as prepro puts its outputs in place, even at once after it marked its folder unfinished:
    one line, 128 + the signal, and none of the folders --out made (here two levels) is left behind, nor the mark."""
    out = tmp_path / "new" / "out"
    name, after = where
    done = subprocess.run([sys.executable, "-c", signalled_at_io_call(name, 1, sig, after), "prepro", "--karpathy",
                           str(karpathy), "--out", str(out)], env=traced_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120, preexec_fn=default_sigint)
    assert done.returncode == 128 + sig and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset_coco.json"]


def test_a_folder_a_failed_prepro_made_is_kept_with_what_was_put_in_it_meanwhile(karpathy, tmp_path, monkeypatch):
    from satic.data import labels

    karpathy.write_text(json.dumps({"images": KARPATHY["images"][:3]}))  # every image with an id: no warning
    out = tmp_path / "new" / "out"

    def meanwhile(*args, **kwargs):
        (tmp_path / "new" / "mine.txt").write_text("another program's")
        raise KeyboardInterrupt

    monkeypatch.setattr(labels, "write_cocotalk", meanwhile)
    with pytest.raises(KeyboardInterrupt):
        labels.prepare_labels(karpathy, out, word_count_threshold=1)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["mine.txt"]  # out/, empty, is removed
