"""Result files, COCO-server submissions, reference readers and `satic score`."""
import json
import re

import pytest

from satic.cli import main as satic_main
from satic.cli.score import main as score_main
from satic.errors import SaticError
from satic.evaluation import coco_metrics
from satic.evaluation.metrics import java_available
from satic.evaluation.results import (read_image_ids, read_references, read_results, server_results_name,
                                      write_results, write_server_results)

KARPATHY = {"images": [
    {"cocoid": 11, "split": "test", "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]},
                                                   {"tokens": ["the", "dog", "is", "running"]}]},
    {"cocoid": 12, "split": "test", "sentences": [{"raw": "Two cats sleep on a sofa."},
                                                   {"raw": "Cats sleeping."}]},
    {"cocoid": 13, "split": "val", "sentences": [{"raw": "A red bus."}]},
    {"cocoid": 14, "split": "restval", "sentences": [{"raw": "A man surfing."}]},
    {"cocoid": 15, "split": "train", "sentences": [{"raw": "A bird."}]},
]}
COCO = {"images": [{"id": 11}, {"id": 12}], "annotations": [
    {"image_id": 11, "id": 1, "caption": "A dog runs."}, {"image_id": 12, "id": 2, "caption": "Two cats."},
    {"image_id": 11, "id": 3, "caption": "The dog is running"}]}


def test_results_round_trip(tmp_path):
    path = write_results(tmp_path / "res.json", {3: "a dog", 1: "a cat"})
    assert json.loads(path.read_text()) == [{"image_id": 3, "caption": "a dog"}, {"image_id": 1, "caption": "a cat"}]
    assert read_results(path) == {3: "a dog", 1: "a cat"}
    assert [p.name for p in tmp_path.iterdir()] == ["res.json"]  # no temp file left behind


@pytest.mark.parametrize("content, message", [
    ('[{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]', "more than once: 1"),
    ('[{"image_id": "b", "caption": "a"}, {"image_id": 2, "caption": "a"}, {"image_id": "b", "caption": "c"}, '
     '{"image_id": 2, "caption": "d"}]', "2 image ids appear more than once: 2, b$"),  # ints and strings: no TypeError
    ('{"image_id": 1}', "JSON list"),
    ('[{"image_id": 1, "caption": 5}]', "must be a string; not one for image ids 1$"),
    ('[{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "a \\ud800 dog"}]',
     r"the captions of image ids 2 hold a lone surrogate escape \(\\ud800-\\udfff\), which is not a character; write "
     "them as UTF-8 text$"),
    ('[{"image_id": 1, "caption": "a"}, {"image_id": [2], "caption": "b"}]', r"not \[2\] \(list positions 1, counted"),
    ('[{"image_id": 1.5, "caption": "a"}, {"image_id": true, "caption": "b"}]',
     r"not 1\.5, true \(list positions 0, 1,"),
    ("[{", "not valid JSON"),
    ("5", "JSON list"), ("{}", "JSON list"), ('["captions"]', "JSON list"), ("[1]", "JSON list"),
    ('[{"image_id": 1, "captions": ["a dog", "a cat"]}]',  # satic caption --n-best 2 --out
     r'holds several captions per image \("captions" lists: `satic caption --n-best` or --sample-n\); a COCO result '
     r'file has one "caption" per image'),
])
def test_bad_result_files(tmp_path, content, message):
    path = tmp_path / "res.json"
    path.write_text(content)
    with pytest.raises(SaticError, match=message):
        read_results(path)


def test_server_results_cover_the_image_list(tmp_path):
    path = write_server_results(tmp_path, "test2014", "satic-k2", {5: "a", 6: "b"}, [6, 5])
    assert path.name == "captions_test2014_satic-k2_results.json"
    assert read_results(path) == {5: "a", 6: "b"}
    with pytest.raises(SaticError) as err:
        write_server_results(tmp_path, "val2014", "x", [(5, "a"), (5, "b"), (9, "c")], [5, 6, 7])
    text = str(err.value)
    assert "2 missing: 6, 7" in text and "1 duplicated: 5" in text and "1 not in the image list: 9" in text
    assert not (tmp_path / "captions_val2014_x_results.json").exists()


@pytest.mark.parametrize("split, alg", [("test2015", "x"), ("val2014", "my_alg"), ("val2014", "a/b"),
                                        ("test2014", "a b")])
def test_server_name_checks(split, alg):
    with pytest.raises(SaticError):
        server_results_name(split, alg)


def test_server_name_may_leave_the_algorithm_out():
    """The CodaLab server opens captions_test2014__results.json and captions_val2014__results.json, the names in
    the zip of the reference's scored submission."""
    assert server_results_name("test2014", "") == "captions_test2014__results.json"
    assert server_results_name("val2014", "") == "captions_val2014__results.json"


def test_read_references_karpathy_and_coco(tmp_path):
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(KARPATHY))
    assert read_references(karpathy, "test") == {11: ["A dog runs.", "the dog is running"],
                                                  12: ["Two cats sleep on a sofa.", "Cats sleeping."]}
    assert sorted(read_references(karpathy, "train")) == [14, 15]
    assert sorted(read_references(karpathy)) == [11, 12, 13, 14, 15]
    with pytest.raises(SaticError, match=r"no images in split 'testing'; its images are in 'restval', 'test', 'train', "
                                         r"'val'$"):
        read_references(karpathy, "testing")
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps(COCO))
    assert read_references(coco) == {11: ["A dog runs.", "The dog is running"], 12: ["Two cats."]}
    with pytest.raises(SaticError, match="no splits"):
        read_references(coco, "test")
    other = tmp_path / "other.json"
    other.write_text('{"foo": 1}')
    with pytest.raises(SaticError, match="not a Karpathy"):
        read_references(other)
    listed_id = tmp_path / "listed_id.json"
    listed_id.write_text(json.dumps({"images": [{"cocoid": [11], "sentences": [{"raw": "A dog."}]}]}))
    with pytest.raises(SaticError, match=r"image's id must be an integer or a string, not \[11\]"):
        read_references(listed_id)
    listed_annotation = tmp_path / "listed_annotation.json"
    listed_annotation.write_text(json.dumps({"annotations": [{"image_id": {"id": 11}, "caption": "A dog."}]}))
    with pytest.raises(SaticError, match=r"image_id must be an integer or a string, not \{\"id\": 11\}"):
        read_references(listed_annotation)


def test_read_image_ids(tmp_path):
    (tmp_path / "info.json").write_text(json.dumps({"images": [{"id": 7}, {"id": 3}]}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "ids.txt").write_text("4\n5\n")
    assert read_image_ids(tmp_path / "info.json") == [7, 3]
    assert read_image_ids(tmp_path / "list.json") == [1, 2]
    assert read_image_ids(tmp_path / "ids.txt") == [4, 5]
    (tmp_path / "bad.txt").write_text("4\nfive\n")
    with pytest.raises(SaticError, match="one integer"):
        read_image_ids(tmp_path / "bad.txt")
    (tmp_path / "digits.json").write_text('["8", 9]')
    assert read_image_ids(tmp_path / "digits.json") == [8, 9]
    (tmp_path / "not_ids.json").write_text('[1.5, true, "x", [2], 3]')
    with pytest.raises(SaticError, match=r"must be integers, not 1\.5, true, \"x\", \[2\]$"):
        read_image_ids(tmp_path / "not_ids.json")
    for name, text in (("empty.txt", ""), ("empty.json", "[]"), ("no_images.json", '{"images": []}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(SaticError, match=f"image list {tmp_path / name} holds no image ids"):
            read_image_ids(tmp_path / name)
    (tmp_path / "twice.txt").write_text("4\n5\n4\n6\n5\n")
    with pytest.raises(SaticError, match=f"image list {tmp_path / 'twice.txt'} names 4, 5 more than once"):
        read_image_ids(tmp_path / "twice.txt")
    with pytest.raises(SaticError, match=f"image list {tmp_path} is a folder; give the image-info JSON"):
        read_image_ids(tmp_path)


def test_read_image_ids_by_content(tmp_path):
    """An image-info JSON under another suffix is read as JSON, and a text list saved with a BOM as text."""
    info = json.dumps({"images": [{"id": 7, "file_name": "COCO_test2014_000000000007.jpg"}, {"id": 3}]})
    (tmp_path / "image_info_test2014.JSON").write_text(info)
    (tmp_path / "image_info_test2014").write_text("\n " + info)
    (tmp_path / "ids.txt").write_text("\ufeff4\n5\n", encoding="utf-8")
    assert read_image_ids(tmp_path / "image_info_test2014.JSON") == [7, 3]
    assert read_image_ids(tmp_path / "image_info_test2014") == [7, 3]
    assert read_image_ids(tmp_path / "ids.txt") == [4, 5]


def test_read_image_ids_names_images_without_an_id_briefly(tmp_path):
    """A Karpathy dataset JSON given as the list: positions, not each image's captions, in the message."""
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [{"cocoid": n, "sentences": [{"raw": "a dog " * 50}]} for n in range(12)]}))
    with pytest.raises(SaticError) as err:
        read_image_ids(path)
    assert str(err.value).startswith(f'{path}: 12 images have no "id" (list positions 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 '
                                     "... (12 in all), counted from 0); give the split's COCO image-info JSON")
    assert len(str(err.value)) - len(str(path)) < 250  # not the images' captions, whatever the folder's name
    (tmp_path / "long.json").write_text(json.dumps([list(range(30)), 3]))
    with pytest.raises(SaticError, match=r"must be integers, not \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11\.\.\.$"):
        read_image_ids(tmp_path / "long.json")


def test_read_image_ids_refuses_another_splits_images(tmp_path):
    """captions_val2014.json given for test2014 would be captioned in full, then rejected by the server."""
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}]}))
    assert read_image_ids(path, "val2014") == [42]
    with pytest.raises(SaticError, match=r"names val2014 images \(file_name COCO_val2014_...\), not test2014; give "
                                         r"the test2014 image list, or --coco-server val2014$"):
        read_image_ids(path, "test2014")


def test_score_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Java: quick, and the fallback is what runs
    refs = tmp_path / "dataset_coco.json"
    refs.write_text(json.dumps(KARPATHY))
    results = write_results(tmp_path / "res.json", {11: "a dog is running", 12: "two cats on a sofa"})
    out = tmp_path / "metrics.json"
    assert score_main(["--results", str(results), "--references", str(refs), "--split", "test",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    expected, per_image = coco_metrics({11: ["A dog runs.", "the dog is running"],
                                        12: ["Two cats sleep on a sofa.", "Cats sleeping."]},
                                       {11: ["a dog is running"], 12: ["two cats on a sofa"]})
    assert saved["metrics"] == expected and saved["num_images"] == 2
    assert saved["per_image"]["11"] == per_image[11]
    assert re.search(rf"^CIDEr +{expected['CIDEr']:.4f} +{100 * expected['CIDEr']:.1f}$", printed, re.M)


def test_score_command_result_without_references(tmp_path, capsys):
    refs = tmp_path / "dataset_coco.json"
    refs.write_text(json.dumps(KARPATHY))
    results = write_results(tmp_path / "res.json", {11: "a dog", 13: "a bus"})
    assert satic_main(["score", "--results", str(results), "--references", str(refs), "--split", "test"]) == 2
    assert capsys.readouterr().err.endswith(f"1 result image has no references in {refs} (split test): 13; score "
                                            "captions of the test split's images only, or leave out --split\n")
    quoted = tmp_path / "quoted.json"
    quoted.write_text(json.dumps([{"image_id": "11", "caption": "a dog"}, {"image_id": "12", "caption": "a bus"},
                                  {"image_id": "²³", "caption": "a cat"}]))
    assert satic_main(["score", "--results", str(quoted), "--references", str(refs), "--split", "test"]) == 2
    assert ('3 result images have no references in ' in (err := capsys.readouterr().err)
            and ': "11", "12", "²³"; the references have them with the ids as numbers: write image_id as '
            'the references do' in err)
    many = write_results(tmp_path / "many.json", {i: "a dog" for i in range(100, 112)})
    assert satic_main(["score", "--results", str(many), "--references", str(refs), "--split", "test"]) == 2
    assert capsys.readouterr().err.endswith(": 100, 101, 102, 103, 104, 105, 106, 107, 108, 109 and 2 more; score "
                                            "captions of the test split's images only, or leave out --split\n")
    assert satic_main(["score", "--results", str(many), "--references", str(refs)]) == 2
    assert capsys.readouterr().err.endswith(" and 2 more; give the references of these images, or score only the "
                                            "images they have\n")


def test_score_refuses_an_empty_result_file_and_writes_no_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Java
    refs = tmp_path / "dataset_coco.json"
    refs.write_text(json.dumps(KARPATHY))
    results = write_results(tmp_path / "res.json", {})
    assert satic_main(["score", "--results", str(results), "--references", str(refs), "--out",
                       str(tmp_path / "metrics.json")]) == 2
    assert capsys.readouterr().err == f"satic score: error: {results} holds no results\n"
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("option", ["--results", "--references"])
def test_score_refuses_an_out_that_is_one_of_its_inputs(tmp_path, capsys, option):
    refs = tmp_path / "dataset_coco.json"
    refs.write_text(json.dumps(KARPATHY))
    results = write_results(tmp_path / "res.json", {11: "a dog", 12: "two cats"})
    before = {path: path.read_text() for path in (refs, results)}
    given = results if option == "--results" else refs
    (tmp_path / "link.json").symlink_to(given.name)
    for out in (given, tmp_path / "link.json"):
        assert satic_main(["score", "--results", str(results), "--references", str(refs), "--split", "test",
                           "--out", str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err == (f"satic score: error: --out {out} is the {option} file {given}, which "
                                           "this command reads; give --out another path\n")
    assert {path: path.read_text() for path in (refs, results)} == before


@pytest.mark.parametrize("change, message", [
    (lambda images: images[1].update(cocoid=11),
     "images[0] and images[1] both have id 11, so one image's references would replace the other's; give every "
     "image its own id"),
    (lambda images: images[1].update(sentences=[]),
     "images[1] (id 12) has no sentences; add its reference captions or remove it"),
])
def test_score_refuses_karpathy_references_it_would_misread(tmp_path, capsys, change, message):
    data = json.loads(json.dumps(KARPATHY))
    change(data["images"])
    refs = tmp_path / "dataset_coco.json"
    refs.write_text(json.dumps(data))
    results = write_results(tmp_path / "res.json", {11: "a dog"})
    assert satic_main(["score", "--results", str(results), "--references", str(refs), "--split", "test"]) == 2
    assert capsys.readouterr().err == f"satic score: error: {refs}: {message}\n"


def test_result_ids_are_numbers_where_they_are_written_as_ascii_digits():
    from satic.evaluation.results import check_result_ids, result_id

    assert [result_id(i) for i in ("391895", "000000391895", "²³", "12.5", "9" * 5000, 7)] == [
        391895, 391895, "²³", "12.5", "9" * 5000, 7]
    with pytest.raises(SaticError, match="images '0' and '000' would both be written as image id 0; rename one"):
        check_result_ids(["0", "5", "000"])


def test_karpathy_images_are_keyed_by_cocoid_before_id_and_imgid(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": [
        {"cocoid": 11, "id": 5, "imgid": 0, "split": "test", "sentences": [{"raw": "A dog."}]},
        {"id": 6, "imgid": 1, "split": "test", "sentences": [{"raw": "A cat."}]},
        {"imgid": 2, "split": "test", "sentences": [{"raw": "A bus."}]}]}))
    assert read_references(path) == {11: ["A dog."], 6: ["A cat."], 2: ["A bus."]}


def test_a_data_folder_file_is_used_only_when_it_covers_every_image(tmp_path):
    from satic.evaluation.results import find_references

    (tmp_path / "references.json").write_text(json.dumps({"annotations": [{"image_id": 11, "caption": "A dog."}]}))
    assert find_references(tmp_path, [11, 12]) is None  # not a KeyError, not half the references
    (tmp_path / "dataset.json").write_text(json.dumps(KARPATHY))
    path, refs = find_references(tmp_path, [11, 12])
    assert path == tmp_path / "dataset.json" and refs == {11: ["A dog runs.", "the dog is running"],
                                                         12: ["Two cats sleep on a sofa.", "Cats sleeping."]}
    assert find_references(tmp_path, [11]) == (tmp_path / "references.json", {11: ["A dog."]})


def test_ids_written_as_one_result_id_are_refused_and_nothing_is_written(tmp_path):
    from satic.evaluation.results import write_caption_lists

    with pytest.raises(SaticError, match="images '0' and '000' would both be written as image id 0"):
        write_results(tmp_path / "res.json", [("0", "a dog"), ("000", "a cat")])
    with pytest.raises(SaticError, match="images '7' and '007' would both be written as image id 7"):
        write_caption_lists(tmp_path / "lists.json", [("7", ["a dog"]), ("007", ["a cat"])])
    assert list(tmp_path.iterdir()) == []


def test_captions_with_scores_keep_them_and_a_score_json_cannot_hold_is_null(tmp_path):
    from satic.evaluation.results import write_caption_lists

    write_results(tmp_path / "res.json", [("3", {"caption": "a dog", "score": -1.25}),
                                          ("cat", {"caption": "a cat", "score": float("-inf")})])
    assert (tmp_path / "res.json").read_text() == json.dumps(
        [{"image_id": 3, "caption": "a dog", "score": -1.25}, {"image_id": "cat", "caption": "a cat", "score": None}],
        indent=1) + "\n"
    assert read_results(tmp_path / "res.json") == {3: "a dog", "cat": "a cat"}
    assert write_caption_lists(tmp_path / "lists.json", [("7", [{"caption": "a dog", "score": -0.5},
                                                                {"caption": "a cat", "score": float("nan")}])]
                               ) == tmp_path / "lists.json"
    assert json.loads((tmp_path / "lists.json").read_text()) == [
        {"image_id": 7, "captions": ["a dog", "a cat"], "scores": [-0.5, None]}]


# The PTB tokenizer splits a final "a." off as "a ." when the next line starts a sentence ("The ..."), not at the
# end of its input: the toolkit's COCOEvalCap feeds it the references in the annotation file's images[] order.
ORDERED = {"images": [{"id": 1}, {"id": 2}], "annotations": [
    {"image_id": 2, "id": 1, "caption": "The cat sits."}, {"image_id": 1, "id": 2, "caption": "A dog sits by a."},
    {"image_id": 2, "id": 3, "caption": "a cat"}]}


@pytest.mark.skipif(not java_available(), reason="Java not installed: the Python tokenizer reads lines alone")
def test_references_and_candidates_are_tokenized_in_the_files_image_order_as_the_toolkit(tmp_path):
    from satic.evaluation.metrics import coco_metrics_of_sets, tokenize
    from satic.evaluation.results import find_references

    assert tokenize({1: ["A dog sits by a."], 2: ["The cat sits."]})[1] == ["a dog sits by a"]  # as COCOEvalCap
    assert tokenize({2: ["The cat sits."], 1: ["A dog sits by a."]})[1] == ["a dog sits by a."]
    refs = tmp_path / "captions_val2014.json"
    refs.write_text(json.dumps(ORDERED))
    assert list(read_references(refs)) == [1, 2]  # images[] order, not the annotations'
    gts = {1: ["A dog sits by a."], 2: ["The cat sits.", "a cat"]}
    # satic score: a result file in another order than the toolkit's
    results = write_results(tmp_path / "res.json", {2: "The cat sits", 1: "a dog sits by a"})
    out = tmp_path / "metrics.json"
    assert score_main(["--results", str(results), "--references", str(refs), "--out", str(out)]) == 0
    # satic eval: its references keep the file's order, and the candidates are tokenized in that order
    path, found = find_references(tmp_path, [2, 1], refs)
    assert found == gts and list(found) == [1, 2]
    ending_in_a = {2: ["The cat sits"], 1: ["a dog sits by a."]}  # "a." only at the end of the tokenizer's input
    both = coco_metrics_of_sets(found, {"file order": {1: ["a dog sits by a"], 2: ["The cat sits"]},
                                        "other order": ending_in_a})  # one METEOR process for both
    expected, scored = both["file order"][0], both["other order"][0]
    assert json.loads(out.read_text())["metrics"] == expected
    assert expected["Bleu_1"] == pytest.approx(1.0)  # every word in its references, as the toolkit tokenizes
    assert scored.pop("bad_count_rate") == 0.0
    assert scored == {k: v for k, v in expected.items() if k != "bad_count_rate"}


def test_read_image_ids_takes_json_by_its_suffix_in_any_case_or_by_its_start_after_a_bom(tmp_path):
    """A JSON list after a BOM is read as JSON, whose reader names the BOM, not as a text list of one id a line."""
    (tmp_path / "ids").write_text("\ufeff[4, 5]", encoding="utf-8")
    with pytest.raises(SaticError, match=r"ids is not valid JSON \(Unexpected UTF-8 BOM"):
        read_image_ids(tmp_path / "ids")
    (tmp_path / "image_info.JSON").write_text("images: 4, 5")
    with pytest.raises(SaticError, match=r"image_info\.JSON.*not valid JSON"):
        read_image_ids(tmp_path / "image_info.JSON")


def test_an_image_list_of_a_split_the_server_does_not_take_is_refused_without_offering_it(tmp_path):
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps({"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}]}))
    with pytest.raises(SaticError, match=r"names train2014 images \(file_name COCO_train2014_...\), not val2014; give "
                                         r"the val2014 image list$"):
        read_image_ids(path, "val2014")


def test_result_ids_listed_twice_are_named_in_order(tmp_path):
    path = tmp_path / "res.json"
    path.write_text(json.dumps([{"image_id": i, "caption": "a"} for i in (10, 9, "b", 10, 9, "b")]))
    with pytest.raises(SaticError, match="3 image ids appear more than once: 9, 10, b$"):
        read_results(path)


def test_a_coco_annotation_file_whose_images_list_has_an_entry_of_no_id_keeps_its_order(tmp_path):
    """An images[] entry whose id is no image id (a list, a float) is passed over, not a TypeError."""
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [{"id": [1]}, {"id": 2}, {"id": 1.5}, {"id": 1}, "x"],
                                "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"},
                                                {"image_id": 3, "caption": "three"}]}))
    assert list(read_references(path).items()) == [(2, ["two"]), (1, ["one"]), (3, ["three"])]


@pytest.mark.parametrize("text, reason", [("[" * 100000 + "]" * 100000, "maximum recursion depth exceeded"),
                                          ('[{"image_id": ' + "9" * 5000 + ', "caption": "a"}]', "limit (4300")])
def test_score_refuses_json_that_python_cannot_hold_naming_the_file(tmp_path, capsys, text, reason):
    refs = tmp_path / "dataset_coco.json"
    refs.write_text(json.dumps(KARPATHY))
    results = tmp_path / "res.json"
    results.write_text(text)
    assert satic_main(["score", "--results", str(results), "--references", str(refs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"satic score: error: result file {results} is not valid JSON (") and reason in err
    assert err.endswith("; re-create or re-download it\n") and err.count("\n") == 1


def test_result_ids_of_up_to_18_digits_are_numbers_and_file_names_their_utf8_text():
    from satic.evaluation.results import result_id

    assert result_id("9" * 18) == int("9" * 18) and result_id("000000391895") == 391895
    assert result_id("9" * 19) == "9" * 19 and result_id("12.5") == "12.5" and result_id(7) == 7
    assert result_id("caf\udcc3\udca9") == "café"  # a UTF-8 file name as Python reads it under an ASCII locale
    assert result_id("caf\udce9") == "caf\udce9"  # a Latin-1 name: no UTF-8 text, so the name as read


@pytest.mark.parametrize("entries", [[{"image_id": 1}], [{"caption": "a dog"}], [{"image_id": 1, "caption": "a"}, 3]])
def test_a_result_entry_without_image_id_and_caption_is_refused(tmp_path, entries):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(SaticError, match=r'expected a JSON list of \{"image_id", "caption"\} objects'):
        read_results(path)


def test_references_without_sentences_or_captions_are_refused(tmp_path):
    path = tmp_path / "refs.json"
    for data, message in (({"images": [{"cocoid": 1}]}, "every image needs a sentences"),
                          ({"images": [{"cocoid": 1, "sentences": "a dog"}]}, "every image needs a sentences"),
                          ({"annotations": [{"image_id": 1}]}, "every annotation needs image_id and a caption"),
                          ({"annotations": [{"caption": "a dog"}]}, "every annotation needs image_id and a caption"),
                          ({"annotations": [{"image_id": 1, "caption": 5}]}, "every annotation needs image_id"),
                          ({"images": [{"cocoid": 1, "sentences": [{"tokens": ["a", None]}]}]},
                           "a sentence's tokens must be strings, not null; give each sentence its 'raw' text"),
                          ({"images": [{"cocoid": 1, "sentences": [{"raw": "a dog"}]},
                                       {"cocoid": 2, "sentences": [{"raw": "a \ud800 dog"}]}]},
                           r"refs.json: the captions of images\[1\] \(id 2\) hold a lone surrogate escape"),
                          ({"annotations": [{"image_id": 2, "caption": "\udfff"}]},
                           r"refs.json: the captions of image id 2 hold a lone surrogate escape")):
        path.write_text(json.dumps(data))
        with pytest.raises(SaticError, match=message):
            read_references(path)


def test_a_given_reference_file_must_hold_every_image(tmp_path):
    from satic.evaluation.results import find_references

    path = tmp_path / "refs.json"
    path.write_text(json.dumps(KARPATHY))
    assert find_references(tmp_path / "data", [12, 11], given=path) == (
        path, {11: ["A dog runs.", "the dog is running"], 12: ["Two cats sleep on a sofa.", "Cats sleeping."]})
    with pytest.raises(SaticError, match=r"has no references for 1 of the images \(e.g. \[99\]\); fix it"):
        find_references(tmp_path / "data", [11, 99], given=path, fix="fix it")
    with pytest.raises(SaticError, match=r"has no references for 4 of the images \(e.g. \[99, 98, 97\]\); fix it$"):
        find_references(tmp_path / "data", [99, 11, 98, 97, 96], given=path, fix="fix it")


def test_the_evaluation_references_are_the_val_and_test_images_raw_captions():
    from satic.evaluation.results import evaluation_references_file

    images = [{"cocoid": 1, "split": "train", "sentences": [{"raw": "A cat."}]},
              {"cocoid": 2, "split": "restval", "sentences": [{"raw": "A bus."}]},
              {"cocoid": 3, "split": "val", "sentences": [{"raw": "A dog."}, {"tokens": ["a", "red", "dog"]}]},
              {"split": "test", "sentences": [{"raw": "No id."}]}]
    made = evaluation_references_file(images, "data/dataset.json")
    assert made["images"] == [{"id": 3, "split": "val"}]
    assert made["annotations"] == [{"image_id": 3, "id": 0, "caption": "A dog."},
                                   {"image_id": 3, "id": 1, "caption": "a red dog"}]
    assert evaluation_references_file(images[:2], "data/dataset.json") is None


def test_an_empty_result_list_reads_as_no_captions(tmp_path):
    path = tmp_path / "res.json"
    path.write_text("[]")
    assert read_results(path) == {}


@pytest.mark.parametrize("data, message", [
    ([{"cocoid": 1, "sentences": [{"raw": "A dog."}]}], "not a Karpathy dataset JSON"),
    ({"images": [5]}, "every image needs a sentences"),
    ({"images": [{"split": "test", "sentences": [{"raw": "A dog."}]}]}, "an image has no cocoid/id/imgid$"),
    ({"images": [{"cocoid": 1, "sentences": [{"text": "A dog."}]}]}, "a sentence has neither 'raw' text nor a "),
    ({"images": [{"cocoid": 1, "sentences": ["A dog."]}]}, "a sentence has neither 'raw' text nor a 'tokens' list$"),
    ({"annotations": [5]}, "every annotation needs image_id and a caption string$"),
], ids=["a-list", "an-image-not-an-object", "an-image-of-no-id", "a-sentence-of-no-text", "a-sentence-not-an-object",
        "an-annotation-not-an-object"])
def test_reference_files_of_another_shape_are_refused_by_name(tmp_path, data, message):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SaticError, match=f"^{re.escape(str(path))}: .*{message}"):
        read_references(path)


def test_an_image_list_that_is_no_list_or_whose_ids_are_no_ascii_digits_is_refused(tmp_path):
    for text in ('{"ids": [1, 2]}', "5", '{"images": {"id": 1}}'):
        (tmp_path / "ids.json").write_text(text)
        with pytest.raises(SaticError, match=r'ids\.json: expected a list of image ids or \{"images": \[\{"id"\}\]\}$'):
            read_image_ids(tmp_path / "ids.json")
    (tmp_path / "ids.json").write_text(json.dumps(["12", "\u00b2"]))  # "²".isdigit(), but no integer
    with pytest.raises(SaticError, match=r'must be integers, not "\\u00b2"$'):
        read_image_ids(tmp_path / "ids.json")


def test_an_image_list_whose_file_names_are_not_text_is_read_for_any_split(tmp_path):
    path = tmp_path / "image_info_test2014.json"
    path.write_text(json.dumps({"images": [{"id": 5, "file_name": 5}, {"id": 6, "file_name": None}]}))
    assert read_image_ids(path, "test2014") == [5, 6]


def test_messages_show_ten_ids_and_forty_characters_of_an_id_in_full(tmp_path):
    path = tmp_path / "info.json"
    path.write_text(json.dumps({"images": [{"file_name": f"{n}.jpg"} for n in range(10)]}))
    with pytest.raises(SaticError, match=r"10 images have no \"id\" \(list positions 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, "
                                         "counted from 0\\)"):
        read_image_ids(path)
    for bad, shown in (("x" * 38, '"' + "x" * 38 + '"'), ("x" * 39, '"' + "x" * 36 + "...")):
        path.write_text(json.dumps([bad]))
        with pytest.raises(SaticError, match=f"must be integers, not {re.escape(shown)}$"):
            read_image_ids(path)
