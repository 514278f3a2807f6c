"""`satic eval` and `evaluate_split` on a tiny built-in dataset; COCO server files."""
from __future__ import annotations

import json
import re
import shutil
import time
from urllib.parse import unquote

import pytest
import torch
from processes import killed_between_outputs_then_rerun

from satic.captioner import Captioner
from satic.cli import main as satic_main
from satic.data.labels import read_cocotalk
from satic.data.stores import open_store
from satic.data.synth import prepare_builtin
from satic.decoding import DecodeOptions
from satic.decoding.options import without_bad_endings
from satic.errors import SaticError
from satic.evaluation.evaluate import EVAL_OUTPUTS, caption_split, evaluate_split, open_data, server_results
from satic.evaluation.results import read_results
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import load_checkpoint, save_checkpoint

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_builtin(tmp_path_factory.mktemp("synth"), images=40, feature_dim=FEATURE_DIM)


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    vocab, _ = read_cocotalk(dataset.info_json)
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), group_size=2, num_layers=1, d_model=32, d_ff=64,
                                 num_heads=4, att_feat_size=FEATURE_DIM, max_positions=64)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", model, vocab, extra={"decode": {"max_length": 8}})


@pytest.fixture(scope="module")
def test_ids(dataset):
    _, images = read_cocotalk(dataset.info_json)
    return [img["id"] for img in images if img["split"] == "test"]


def test_eval_cli_writes_everything_and_agrees_with_score(dataset, checkpoint, test_ids, tmp_path, capsys,
                                                          without_java):
    out = tmp_path / "eval"
    code = satic_main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), "--split", "test",
                       "--batch-size", "3", "--out", str(out)])
    printed, said = capsys.readouterr()
    assert code == 0 and "CIDEr" in printed and "ms per image (batch size 3, beam size 1" in printed
    assert printed.splitlines()[-1] == f"wrote predictions, scores and metrics to {out}"
    assert f"\ncaptioning test: 100% {len(test_ids)}/{len(test_ids)} [" in said  # progress, as lines here
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == test_ids
    assert all(len(p["caption"].split()) <= 8 for p in predictions)  # the checkpoint's max_length
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == len(test_ids) and metrics["ms_per_image"] > 0 and metrics["batch_size"] == 3
    assert metrics["latency"]["statistic"] == "best" and len(metrics["latency"]["passes_ms_per_image"]) == 3
    scores = json.loads((out / "scores.json").read_text())
    assert sorted(scores) == sorted(str(i) for i in test_ids)
    assert scores[str(test_ids[0])]["caption"] == predictions[0]["caption"]
    # the same predictions scored by `satic score` against the dataset's raw references
    assert satic_main(["score", "--results", str(out / "predictions.json"), "--references",
                       str(dataset.dataset_json), "--out", str(tmp_path / "score.json")]) == 0
    assert json.loads((tmp_path / "score.json").read_text())["metrics"] == metrics["metrics"]
    page = (out / "predictions.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert page.count("<figure") == len(sources) == len(test_ids)
    assert [(out / unquote(src)).resolve() for src in sources] == [dataset.images_dir / f"{i}.png" for i in test_ids]
    shown = [dict(part.rsplit(" ", 1) for part in text.split(", "))
             for text in re.findall(r'<div class="scores">([^<]*)</div>', page)]  # each image's CIDEr and Bleu_4
    assert shown == [{name: f"{scores[str(i)][name]:.3f}" for name in ("CIDEr", "Bleu_4")} for i in test_ids]


def test_an_eval_killed_between_its_outputs_is_finished_by_the_same_command(dataset, checkpoint, tmp_path,
                                                                           without_java):
    """SIGKILL once the first of its files is in place: the same command, without --overwrite, replaces it and
    writes what an uninterrupted run writes."""
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), "--split", "test"]
    assert satic_main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    killed_between_outputs_then_rerun(args, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(EVAL_OUTPUTS)
    for name in ("predictions.json", "scores.json", "predictions.html"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    untimed = [{k: v for k, v in json.loads((folder / "metrics.json").read_text()).items()
                if k not in ("ms_per_image", "latency")} for folder in (out, tmp_path / "whole")]
    assert untimed[0] == untimed[1]


def test_image_root_finds_the_images_kept_outside_the_data_folder(dataset, checkpoint, test_ids, tmp_path, capsys,
                                                                  without_java):
    """As the reference's --image_root: each image's file_path (images/<id>.png here) is taken under --image-root
    for predictions.html; a folder without them says so and writes no page."""
    elsewhere = tmp_path / "photos"
    (elsewhere / "images").mkdir(parents=True)
    for i in test_ids:
        shutil.copy(dataset.images_dir / f"{i}.png", elsewhere / "images" / f"{i}.png")
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), "--batch-size", "5"]
    assert satic_main([*argv, "--image-root", str(elsewhere), "--out", str(tmp_path / "a")]) == 0
    assert "note:" not in capsys.readouterr().err
    sources = re.findall(r'<img src="([^"]+)"', (tmp_path / "a" / "predictions.html").read_text())
    assert [(tmp_path / "a" / unquote(src)).resolve() for src in sources] == [
        (elsewhere / "images" / f"{i}.png").resolve() for i in test_ids]
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert satic_main([*argv, "--image-root", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 0
    assert f"note: no image of the split is under --image-root {tmp_path / 'empty'} (e.g. {tmp_path / 'empty'}" \
           in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["metrics.json", "predictions.json", "scores.json"]
    assert satic_main([*argv, "--image-root", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    assert f"--image-root {tmp_path / 'none'} is not a folder" in capsys.readouterr().err


def test_batched_equals_one_at_a_time_and_max_images(dataset, checkpoint, test_ids):
    captioner = Captioner.load(checkpoint)
    data = open_data(captioner, dataset.data_dir)
    for beam_size in (1, 3):
        options = captioner.options(beam_size)
        ids, one = caption_split(captioner, data, "test", options, batch_size=1)
        _, batched = caption_split(captioner, data, "test", options, batch_size=3)
        assert ids == test_ids and one == batched
    ids, two = caption_split(captioner, data, "val", captioner.options(), batch_size=4, max_images=2)
    assert len(ids) == len(two) == 2


def test_one_split_generator_serves_evaluation_validation_and_distillation(dataset, checkpoint, test_ids):
    """Evaluation, validation during training and seq-KD labels caption a split through one generator
    (satic.evaluation.splits.decode_split): the same greedy words from each, n_best rows per image."""
    from types import SimpleNamespace

    from satic.evaluation.splits import decode_split, model_decode
    from satic.training.config import EvalConfig
    from satic.training.distill import teacher_captions
    from satic.training.validation import caption_split as validation_captions

    captioner = Captioner.load(checkpoint, trace=False)
    data = open_data(captioner, dataset.data_dir)
    ids, captions = caption_split(captioner, data, "test", captioner.options(), batch_size=3)
    config = EvalConfig(split="test", beam_size=1, max_length=8, batch_size=2)
    model = load_checkpoint(checkpoint).model
    validated = validation_captions(model, SimpleNamespace(captions=data), config, torch.device("cpu"))
    assert validated.ids == ids == test_ids and len(validated.refs) == len(ids)
    assert [captioner.vocab.decode(s) for s in validated.seqs] == captions
    options = DecodeOptions(beam_size=3, n_best=2, max_length=8)
    batches = list(decode_split(model_decode(model, "cpu"), data, "train", options, batch_size=4, max_images=6))
    assert [len(b.image_ids) for b, _ in batches] == [4, 2]
    assert all(r.seq.size(0) == 2 * len(b.image_ids) for b, r in batches)
    labels = teacher_captions(model, data, 3, 4, 8, 2, torch.device("cpu"), progress=False)
    first = batches[0][1].seq.numpy()
    index = int(batches[0][0].indices[1])
    assert [list(c) for c in labels[index]] == [list(r[: len(c)]) for r, c in zip(first[2:4], labels[index])]


def test_eval_latency_leaves_out_one_time_work(dataset, checkpoint, test_ids, without_java):
    """The first decode of each shape is slow (as tracing is); the reported latency leaves it out and
    says how it was measured. The demo times its models with the same measure_latency."""
    captioner = Captioner.load(checkpoint)
    decode, shapes = captioner.decode, set()

    def slow_first_decode_per_shape(feats, masks, options):
        if feats.shape not in shapes:
            shapes.add(feats.shape)
            time.sleep(0.2)
        return decode(feats, masks, options)

    captioner.decode = slow_first_decode_per_shape
    result = evaluate_split(captioner, dataset.data_dir, "test", batch_size=1, latency_images=4)
    latency = result.latency
    assert len(shapes) > 1 and latency.images == 4 and latency.batch_size == 1
    assert result.ms_per_image == latency.ms_per_image < 100  # not 200 ms of any first call
    assert len(latency.timing.seconds) == 3 and latency.timing.warm_up == 1
    assert latency.describe().startswith(f"{latency.ms_per_image:.2f} ms per image "
                                         "(batch size 1, beam size 1, fp32, cpu")
    assert latency.describe().endswith("best of 3 passes after 1 untimed, 1 CPU thread over 4 images)")


def test_server_file_covers_the_image_list(dataset, checkpoint, test_ids, tmp_path, capsys):
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(map(str, test_ids)))
    code = satic_main(["eval", "--checkpoint", str(checkpoint), "--features", str(dataset.features),
                       "--coco-server", "test2014", "--alg", "satic-k2", "--image-list", str(listing),
                       "--out", str(tmp_path)])
    printed, said = capsys.readouterr()
    assert code == 0 and printed == f"wrote {tmp_path / 'captions_test2014_satic-k2_results.json'}\n"
    assert f"\ncaptioning: 100% {len(test_ids)}/{len(test_ids)} [" in said
    written = json.loads((tmp_path / "captions_test2014_satic-k2_results.json").read_text())
    assert sorted(r["image_id"] for r in written) == sorted(test_ids)
    captioner, store, ids = Captioner.load(checkpoint), open_store(dataset.features), [str(i) for i in test_ids]
    beam3 = [r["caption"] for r in captioner.caption_store(store, ids, beam_size=3)]
    assert [r["caption"] for r in written] == beam3  # eval_cocotest.py's default beam
    assert beam3 != [r["caption"] for r in captioner.caption_store(store, ids)]  # greedy would differ
    path = server_results(captioner, store, "test2014", "python", listing, tmp_path)  # the same default
    assert [r["caption"] for r in json.loads(path.read_text())] == beam3


def test_server_mode_reads_the_image_list_and_lists_the_store_once(dataset, checkpoint, test_ids, tmp_path,
                                                                   monkeypatch):
    """The list and the store are checked before the model loads, and captioning uses what that check read: a
    COCO test2014 list names 40,775 images, and listing an npz store reads a folder of as many files."""
    from collections import Counter

    from satic.data import stores
    from satic.evaluation import results

    calls = Counter()
    read_image_ids, list_ids = results.read_image_ids, stores.NpzDirStore._list_ids

    def counted_read(*args, **kwargs):
        calls["image list read"] += 1
        return read_image_ids(*args, **kwargs)

    def counted_listing(self):
        calls["store listed"] += 1
        return list_ids(self)

    monkeypatch.setattr(results, "read_image_ids", counted_read)
    monkeypatch.setattr(stores.NpzDirStore, "_list_ids", counted_listing)
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(map(str, test_ids[:3])))
    assert satic_main(["eval", "--checkpoint", str(checkpoint), "--features", str(dataset.features),
                       "--coco-server", "val2014", "--image-list", str(listing), "--beam-size", "1",
                       "--out", str(tmp_path / "out")]) == 0
    assert calls == {"image list read": 1, "store listed": 1}
    written = json.loads((tmp_path / "out" / "captions_val2014__results.json").read_text())
    assert [r["image_id"] for r in written] == test_ids[:3]


def test_server_file_without_an_algorithm_name(dataset, checkpoint, test_ids, tmp_path):
    """Without --alg (or with --alg ""), the names the CodaLab server opens: captions_val2014__results.json."""
    listing = tmp_path / "image_info.json"
    listing.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in test_ids[:2]]}))
    argv = ["eval", "--checkpoint", str(checkpoint), "--features", str(dataset.features), "--coco-server", "val2014",
            "--image-list", str(listing), "--beam-size", "1", "--out", str(tmp_path / "out")]
    assert satic_main(argv) == 0
    written = json.loads((tmp_path / "out" / "captions_val2014__results.json").read_text())
    assert [r["image_id"] for r in written] == test_ids[:2]
    assert satic_main([*argv, "--alg", "", "--overwrite"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["captions_val2014__results.json"]


def test_server_mode_refuses_images_missing_from_the_store(dataset, checkpoint, tmp_path):
    listing = tmp_path / "ids.txt"
    listing.write_text("1\n999999\n")
    with pytest.raises(SaticError, match="999999"):
        satic_main_raising(["eval", "--checkpoint", str(checkpoint), "--features", str(dataset.features),
                            "--coco-server", "val2014", "--alg", "x", "--image-list", str(listing),
                            "--out", str(tmp_path)])
    assert not list(tmp_path.glob("captions_*"))


def test_server_mode_checks_the_list_and_the_store_before_loading_the_model(dataset, checkpoint, tmp_path,
                                                                           monkeypatch):
    """A paper-size checkpoint takes seconds to load: a list or store that cannot give a server file is named first."""
    from satic.captioner import Captioner

    monkeypatch.setattr(Captioner, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    listing = tmp_path / "ids.txt"
    for ids, problem in (("1\n1\n", "more than once"), ("1\n999999\n", "lacks 1 of the 2 listed images")):
        listing.write_text(ids)
        with pytest.raises(SaticError, match=problem):
            satic_main_raising(["eval", "--checkpoint", str(checkpoint), "--features", str(dataset.features),
                                "--coco-server", "val2014", "--image-list", str(listing), "--out", str(tmp_path)])


def test_server_mode_names_listed_regions_saved_as_npy(dataset, checkpoint, test_ids, tmp_path, capsys):
    """A listed image whose regions were saved as <id>.npy in the store's folder of <id>.npz files: the error says
    which file is there and how to re-save it, not only that the image is missing."""
    import shutil

    import numpy as np

    store = tmp_path / "feats_att"
    shutil.copytree(dataset.features, store)
    image_id = test_ids[0]
    np.save(store / f"{image_id}.npy", np.load(store / f"{image_id}.npz")["feat"])
    (store / f"{image_id}.npz").unlink()
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(map(str, test_ids[:2])))
    assert satic_main(["eval", "--checkpoint", str(checkpoint), "--features", str(store), "--coco-server", "val2014",
                       "--image-list", str(listing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"feature store {store} lacks 1 of the 2 listed images (e.g. [{image_id}]); the server needs every image " \
           f"of {listing}; {store} holds {image_id}.npy, not {image_id}.npz; regions are read from <image id>.npz " \
           f"files, the array under key 'feat' (the reference's layout): re-save it, e.g. np.savez(" in err, err


def satic_main_raising(argv):
    from satic.cli.eval import main

    return main(argv[1:])


def test_eval_takes_the_reference_decoding_options(dataset, checkpoint, test_ids, tmp_path, capsys, without_java):
    """eval.py's options on the command line: they reach the decoder and the text, and metrics.json
    records every option used."""
    out = tmp_path / "eval"
    flags = ["--beam-size", "3", "--length-penalty", "wu_0.9", "--block-trigrams", "--remove-bad-endings"]
    assert satic_main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), *flags,
                       "--out", str(out)]) == 0
    predictions = [p["caption"] for p in json.loads((out / "predictions.json").read_text())]
    decoding = json.loads((out / "metrics.json").read_text())["decoding"]
    assert decoding["length_penalty"] == "wu_0.9" and decoding["block_trigrams"] and decoding["remove_bad_endings"]
    assert decoding["beam_size"] == 3 and decoding["max_length"] == 8  # the checkpoint's
    captioner, store, ids = Captioner.load(checkpoint), open_store(dataset.features), [str(i) for i in test_ids]
    plain = [r["caption"] for r in captioner.caption_store(store, ids, beam_size=3, length_penalty="wu_0.9",
                                                            block_trigrams=True)]
    assert predictions == [without_bad_endings(c) for c in plain]

    for bad, named in ((["--sample-method", "sample", "--beam-size", "3"], "--sample-method='greedy'"),
                       (["--beam-size", "4", "--beam-groups", "3"],
                        "--beam-size (4) must be a multiple of --beam-groups"),
                       (["--temperature", "0"], "--temperature must be positive, got 0.0")):
        capsys.readouterr()
        assert satic_main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), *bad]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err
    for bad, named in ((["--temperature", "nan", "--sample-method", "sample"],
                        "--temperature must be positive, got nan"),
                       (["--temperature", "1e-40", "--sample-method", "sample"], "a finite number of at least 1e-30"),
                       (["--diversity-lambda", "inf", "--beam-size", "2", "--beam-groups", "2"],
                        "--diversity-lambda must be a number from -1e+06 to 1e+06")):
        assert satic_main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), *bad]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        satic_main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), "--length-penalty", "wu"])
    assert exit_.value.code == 2 and capsys.readouterr().err.endswith(
        "argument --length-penalty: expected none, wu_A or avg_A with |A| <= 50 (e.g. wu_0.9), got 'wu'\n")
    assert satic_main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir / "nowhere")]) == 2
    assert f"data folder not found: {dataset.data_dir / 'nowhere'}; give the folder" in capsys.readouterr().err


def test_eval_decodes_and_times_on_the_threads_given(dataset, checkpoint, capsys, without_java):
    """--threads sets torch's CPU threads (one in these tests) for the decoding; the timing says how many."""
    before = torch.get_num_threads()
    try:
        assert satic_main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), "--max-images",
                           "4", "--threads", "2"]) == 0
        printed = capsys.readouterr().out
        assert torch.get_num_threads() == 2 and "after 1 untimed, 2 CPU threads over 4 images)" in printed
    finally:
        torch.set_num_threads(before)


def test_the_checkpoints_length_penalty_and_bad_endings_can_be_switched_off(dataset, checkpoint, tmp_path):
    """A checkpoint that records a length penalty and remove_bad_endings decodes with them by default (as eval.py
    takes them from its infos); --length-penalty none and --no-remove-bad-endings turn each off for one command."""
    loaded = load_checkpoint(checkpoint)
    with torch.no_grad():  # captions of several lengths, some ending in "the", so that both options matter
        loaded.model.generator.bias[0] += 1.0
        loaded.model.generator.bias[loaded.vocab.word_to_index["the"]] += 0.5
    plain = save_checkpoint(tmp_path / "plain", loaded.model, loaded.vocab, extra={"decode": {"max_length": 8}})
    recorded = save_checkpoint(tmp_path / "recorded", loaded.model, loaded.vocab, extra={"decode": {
        "max_length": 8, "length_penalty": "avg_1", "remove_bad_endings": True}})
    store, plain = open_store(dataset.features), Captioner.load(plain)

    def captions(*flags: str) -> list[str]:
        out = tmp_path / f"captions{len(list(tmp_path.glob('captions*')))}.json"
        assert satic_main(["caption", "--checkpoint", str(recorded), "--features", str(dataset.features),
                           "--beam-size", "3", *flags, "--out", str(out)]) == 0
        return [r["caption"] for r in json.loads(out.read_text())]

    by_default = captions()
    assert by_default == [r["caption"] for r in plain.caption_store(store, beam_size=3, length_penalty="avg_1",
                                                                     remove_bad_endings=True)]
    both_off = captions("--length-penalty", "none", "--no-remove-bad-endings")
    assert both_off == [r["caption"] for r in plain.caption_store(store, beam_size=3)] != by_default
    assert captions("--no-remove-bad-endings") == [
        r["caption"] for r in plain.caption_store(store, beam_size=3, length_penalty="avg_1")] != by_default
    assert captions("--length-penalty", "none", "--remove-bad-endings") == [
        r["caption"] for r in plain.caption_store(store, beam_size=3, remove_bad_endings=True)] != by_default


def test_result_files_are_replaced_only_with_overwrite(dataset, checkpoint, test_ids, tmp_path, capsys, without_java):
    """eval, caption and score: a rerun onto earlier outputs is refused, files untouched; --overwrite
    replaces exactly the command's own files."""
    out, captions, scores = tmp_path / "eval", tmp_path / "captions.json", tmp_path / "score.json"
    eval_argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), "--max-images", "4",
                 "--out", str(out)]
    caption_argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.features),
                    "--max-images", "3", "--out", str(captions)]
    score_argv = ["score", "--results", str(out / "predictions.json"), "--references", str(dataset.dataset_json),
                  "--out", str(scores)]
    for argv in (eval_argv, caption_argv, score_argv):
        assert satic_main(argv) == 0
    (out / "notes.txt").write_text("mine")
    first = {path: path.read_bytes() for path in [*out.iterdir(), captions, scores]}
    capsys.readouterr()

    for argv, refused in ((eval_argv + ["--beam-size", "2"], f"--out {out} already holds predictions.json, "
                                                             "scores.json, metrics.json, predictions.html"),
                          (caption_argv + ["--beam-size", "2"], f"--out {captions} already exists"),
                          (score_argv, f"--out {scores} already exists")):
        assert satic_main(argv) == 2
        err = capsys.readouterr().err
        assert refused in err and "--overwrite" in err and "Traceback" not in err
    assert {path: path.read_bytes() for path in [*out.iterdir(), captions, scores]} == first

    assert satic_main(eval_argv + ["--beam-size", "2", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["beam_size"] == 2
    assert satic_main(caption_argv + ["--beam-size", "2", "--overwrite"]) == 0
    captioner, store = Captioner.load(checkpoint), open_store(dataset.features)
    beam2 = captioner.caption_store(store, store.nonempty_ids()[:3], beam_size=2)
    assert json.loads(captions.read_text()) == [{"image_id": int(r["image_id"]), "caption": r["caption"]}
                                                for r in beam2]
    assert satic_main(score_argv + ["--overwrite"]) == 0
    assert json.loads(scores.read_text())["metrics"] == json.loads((out / "metrics.json").read_text())["metrics"]
    assert (out / "notes.txt").read_text() == "mine"

    # the files are one set: a failure while writing them (here the page's path is a folder) keeps the old set
    second = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    (out / "predictions.html").unlink()
    (out / "predictions.html").mkdir()
    assert satic_main(eval_argv + ["--beam-size", "3", "--overwrite"]) == 2
    assert "predictions.html is a directory" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == {
        name: data for name, data in second.items() if name != "predictions.html"}
    assert sorted(path.name for path in out.iterdir()) == sorted(second)  # no temporary left


def test_overwrite_removes_a_page_the_new_evaluation_does_not_write(dataset, checkpoint, tmp_path, without_java):
    """Without images there is no predictions.html; an earlier one, which shows other captions, goes."""
    from satic.evaluation.evaluate import write_eval_outputs

    captioner = Captioner.load(checkpoint)
    result = evaluate_split(captioner, dataset.data_dir, "test", max_images=2, latency_images=1, latency_passes=1,
                            out_dir=tmp_path)
    assert (tmp_path / "predictions.html").is_file()
    write_eval_outputs(tmp_path, result, {}, images={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.json", "scores.json"]


def test_eval_and_caption_decode_an_ensemble(dataset, checkpoint, test_ids, tmp_path, capsys, without_java):
    """Several --checkpoint: one ensemble (the reference's eval_ensemble.py), weighted by --weights."""
    vocab, _ = read_cocotalk(dataset.info_json)
    torch.manual_seed(1)
    model = SATModel(load_checkpoint(checkpoint).config).eval()
    other = save_checkpoint(tmp_path / "other", model, vocab, extra={"decode": {"max_length": 8}})
    ensemble = ["--checkpoint", str(checkpoint), "--checkpoint", str(other), "--weights", "1", "3"]
    assert satic_main(["eval", *ensemble, "--data", str(dataset.data_dir), "--out", str(tmp_path / "eval")]) == 0
    assert satic_main(["caption", *ensemble, "--features", str(dataset.features), "--out",
                       str(tmp_path / "captions.json")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == f"{checkpoint} + {other}" and metrics["ensemble_weights"] == [1.0, 3.0]
    captioner, store = Captioner.load([checkpoint, other], weights=[1, 3]), open_store(dataset.features)
    expected = captioner.caption_store(store, [str(i) for i in test_ids])
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert [p["caption"] for p in predictions] == [r["caption"] for r in expected]
    captions = {r["image_id"]: r["caption"] for r in json.loads((tmp_path / "captions.json").read_text())}
    assert [captions[i] for i in test_ids] == [r["caption"] for r in expected]
    assert expected != Captioner.load(checkpoint).caption_store(store, [str(i) for i in test_ids])

    capsys.readouterr()
    for argv, message in ((["--checkpoint", str(checkpoint), "--weights", "2"], "--weights is for an ensemble"),
                          ([*ensemble[:4], "--weights", "1"], "--weights: expected 2 positive finite numbers"),
                          ([*ensemble[:4], "--weights", "1", "inf"], "--weights: expected 2 positive finite numbers")):
        assert satic_main(["caption", *argv, "--features", str(dataset.features)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_a_seed_makes_sampled_captions_repeat(dataset, checkpoint, tmp_path, capsys):
    argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.features), "--max-images", "8",
            "--sample-method", "sample", "--temperature", "1.5"]

    def captions(*extra):
        assert satic_main([*argv, *extra]) == 0
        return capsys.readouterr().out

    assert captions("--seed", "3") == captions("--seed", "3") != captions("--seed", "4")
    assert satic_main([*argv[:-4], "--seed", "3"]) == 2
    assert "--seed only applies to --sample-method sample" in capsys.readouterr().err


def test_a_seed_makes_evals_sampled_captions_repeat(dataset, checkpoint, test_ids, tmp_path, capsys, without_java):
    """In a split's evaluation and in a server file; without --out the same table is printed, and nothing said
    of files."""
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(map(str, test_ids)))
    sampled = ["--checkpoint", str(checkpoint), "--sample-method", "sample", "--temperature", "1.5"]
    split = ["eval", *sampled, "--data", str(dataset.data_dir)]
    server = ["eval", *sampled, "--features", str(dataset.features), "--coco-server", "val2014", "--image-list",
              str(listing), "--beam-size", "1"]

    def captions(argv, seed, out, name):
        assert satic_main([*argv, "--seed", seed, "--out", str(tmp_path / out)]) == 0
        return [r["caption"] for r in json.loads((tmp_path / out / name).read_text())]

    first, again = captions(split, "3", "a", "predictions.json"), captions(split, "3", "b", "predictions.json")
    capsys.readouterr()
    other = captions(split, "4", "c", "predictions.json")
    table = capsys.readouterr().out.splitlines()[:-2]  # before its latency and where it wrote
    assert first == again != other
    assert satic_main([*split, "--seed", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[:-1] == table  # its latency last
    named = "captions_val2014__results.json"
    assert captions(server, "3", "d", named) == captions(server, "3", "e", named) != captions(server, "4", "f", named)


def test_top_k_and_top_p_narrow_what_sampling_draws(dataset, checkpoint, capsys):
    """--top-k 1, or a --top-p too small for a second word, leaves sampling the greedy words; a wider one draws
    others. Both are refused where nothing is drawn."""
    argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.features), "--max-images", "8"]

    def captions(*extra):
        assert satic_main([*argv, *extra]) == 0
        return capsys.readouterr().out

    greedy = captions()
    sampled = ["--sample-method", "sample", "--temperature", "3", "--seed", "3"]
    assert captions(*sampled, "--top-k", "1") == captions(*sampled, "--top-p", "1e-6") == greedy
    assert captions(*sampled, "--top-k", "50") != greedy
    assert satic_main([*argv, "--top-p", "0.9"]) == 2
    assert "--top-p only applies to --sample-method sample; drop it" in capsys.readouterr().err


def test_caption_gives_several_captions_per_image(dataset, checkpoint, tmp_path, capsys):
    argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.features), "--max-images", "4"]
    captioner, store = Captioner.load(checkpoint), open_store(dataset.features)
    ids = store.nonempty_ids()[:4]
    expected = captioner.caption_store(store, ids, beam_size=3, n_best=3)
    assert satic_main([*argv, "--beam-size", "3", "--n-best", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{r['image_id']}\t{r['caption']}" for r in expected]  # 3 lines per image, best first
    assert satic_main([*argv, "--beam-size", "3", "--n-best", "3", "--out", str(tmp_path / "n.json")]) == 0
    written = json.loads((tmp_path / "n.json").read_text())
    assert written == [{"image_id": int(i), "captions": [r["caption"] for r in expected if r["image_id"] == i]}
                       for i in ids]
    assert satic_main([*argv, "--sample-n", "2", "--sample-method", "sample", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 8
    assert satic_main([*argv, "--n-best", "2"]) == 2
    assert "--n-best (2) cannot exceed --beam-size (1)" in capsys.readouterr().err


def test_caption_scores_are_the_captioners(dataset, checkpoint, tmp_path, capsys):
    """--scores: each line gains the caption's score, --out a "score" per image ("scores" beside "captions"), the
    numbers Captioner gives with return_scores; the file stays a COCO result file that `satic score` reads."""
    argv = ["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.features), "--max-images", "5",
            "--batch-size", "2", "--scores"]
    captioner, store = Captioner.load(checkpoint), open_store(dataset.features)
    ids = store.nonempty_ids()[:5]
    greedy = captioner.caption_store(store, ids, return_scores=True)
    assert [row["image_id"] for row in greedy] == ids
    assert [{"caption": row["caption"], "score": row["score"]} for row in greedy] == captioner.caption(
        [captioner.store_regions(store, i) for i in ids], return_scores=True)
    assert satic_main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [f"{r['image_id']}\t{r['caption']}\t{r['score']:.4f}"
                                                    for r in greedy]
    assert satic_main([*argv, "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == [
        {"image_id": int(r["image_id"]), "caption": r["caption"], "score": r["score"]} for r in greedy]
    assert read_results(tmp_path / "s.json") == {int(r["image_id"]): r["caption"] for r in greedy}
    beams = captioner.caption_store(store, ids, beam_size=3, n_best=2, length_penalty="wu_0.9", return_scores=True)
    assert satic_main([*argv, "--beam-size", "3", "--n-best", "2", "--length-penalty", "wu_0.9", "--out",
                       str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text()) == [
        {"image_id": int(i), "captions": [r["caption"] for r in beams if r["image_id"] == i],
         "scores": [r["score"] for r in beams if r["image_id"] == i]} for i in ids]
    assert [r["score"] for r in beams] != [r["score"] for r in greedy for _ in range(2)]


def test_latency_is_per_image_over_the_evaluated_images(dataset, checkpoint, test_ids, without_java):
    """With --max-images below latency_images, latency times the evaluated images only; ms per image is the
    best pass's seconds over the images (not over the batches)."""
    assert len(test_ids) > 3
    captioner = Captioner.load(checkpoint)
    result = evaluate_split(captioner, dataset.data_dir, "test", batch_size=2, max_images=3, latency_images=100,
                            latency_passes=1)
    latency = result.latency
    assert result.num_images == latency.images == 3 and latency.batch_size == 2
    assert latency.ms_per_image == pytest.approx(latency.timing.value / 3 * 1000.0, rel=1e-12)
    assert latency.as_dict()["passes_ms_per_image"] == [pytest.approx(latency.ms_per_image, rel=1e-12)]


def test_the_library_refuses_existing_outputs_without_overwrite(dataset, checkpoint, test_ids, tmp_path, without_java):
    """evaluate_split and server_results, called from Python, refuse as the command does: before any work."""
    (tmp_path / "predictions.html").write_text("an earlier evaluation's page")
    with pytest.raises(SaticError, match=f"out_dir {tmp_path} already holds predictions.html; give another "
                                         "directory, or pass --overwrite"):
        evaluate_split(checkpoint, dataset.data_dir, "test", out_dir=tmp_path)
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(map(str, test_ids)))
    server_file = tmp_path / "captions_test2014_x_results.json"
    server_file.write_text("[]")
    with pytest.raises(SaticError, match=f"already holds {server_file.name}"):
        server_results(checkpoint, dataset.features, "test2014", "x", listing, tmp_path)
    assert server_file.read_text() == "[]"
    assert (tmp_path / "predictions.html").read_text() == "an earlier evaluation's page"
    listing.write_text(f"{test_ids[0]}\n999999\n999998\n999997\n999996\n")
    with pytest.raises(SaticError, match=f"feature store {dataset.features} lacks 4 of the 5 listed images "
                                         r"\(e.g. \[999999, 999998, 999997\]\); the server needs every image"):
        server_results(checkpoint, dataset.features, "val2014", "x", listing, tmp_path)
    assert not (tmp_path / "captions_val2014_x_results.json").exists()


def test_without_reference_files_the_label_files_captions_are_the_references(dataset, checkpoint, test_ids,
                                                                             tmp_path, capsys):
    from satic.evaluation.evaluate import split_references

    data = open_data(Captioner.load(checkpoint), dataset.data_dir)
    refs = split_references(data, test_ids[:2], None, tmp_path)  # a folder with no references.json / dataset.json
    assert "scoring against the label file's captions" in capsys.readouterr().out
    index = {img["id"]: n for n, img in enumerate(data.images)}
    for image_id in test_ids[:2]:
        rows = data.labels.captions(index[image_id])
        assert len(rows) == 5 and refs[image_id] == [data.vocab.decode(row) for row in rows]


def test_a_missing_reference_file_is_named_before_the_split_is_captioned(dataset, checkpoint, tmp_path, without_java):
    """On COCO, captioning the split takes minutes: a wrong --references must not wait for it."""
    from satic.evaluation.evaluate import evaluate_split

    captioner = Captioner.load(checkpoint)
    decoded = []
    plain = captioner.decode
    captioner.decode = lambda *args, **kwargs: decoded.append(1) or plain(*args, **kwargs)
    with pytest.raises(SaticError, match=r"nope.json"):
        evaluate_split(captioner, dataset.data_dir, "test", references=tmp_path / "nope.json")
    assert decoded == []
    result = evaluate_split(captioner, dataset.data_dir, "test", max_images=3, latency_images=1, latency_passes=1)
    assert decoded and result.num_images == 3


@pytest.mark.parametrize("command", ["caption", "eval", "score"])
def test_a_second_command_to_the_same_new_out_finishing_first_keeps_its_result(dataset, checkpoint, tmp_path, capsys,
                                                                                monkeypatch, without_java, command):
    """Two commands to one new --out, neither with --overwrite: both pass the start's check; the other one runs
    whole while ours is working (hooked into our captioning or scoring), so ours finishes last. Ours must fail
    saying so and leave the other's files as they are, never replace them silently."""
    import satic.cli.score
    import satic.evaluation.metrics

    out = tmp_path / ("ev" if command == "eval" else f"{command}.json")
    argv = {"caption": ["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.features),
                        "--max-images", "3", "--out", str(out)],
            "eval": ["eval", "--checkpoint", str(checkpoint), "--data", str(dataset.data_dir), "--max-images", "4",
                     "--out", str(out)]}.get(command)
    if command == "score":
        results = tmp_path / "results.json"
        assert satic_main(["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.features),
                           "--max-images", "3", "--out", str(results)]) == 0
        argv = ["score", "--results", str(results), "--references", str(dataset.dataset_json), "--out", str(out)]
    hooked = {"caption": (Captioner, "caption_store_batches"), "eval": (satic.evaluation.metrics, "coco_metrics"),
              "score": (satic.cli.score, "coco_metrics")}[command]
    work = getattr(*hooked)
    others = []

    def work_while_the_other_command_runs(*args, **kwargs):
        if not others:
            others.append(None)
            assert satic_main(argv + ["--beam-size", "2"] if command != "score" else argv) == 0  # theirs
            others[0] = {p: p.read_bytes() for p in (out.iterdir() if out.is_dir() else [out])}
        return work(*args, **kwargs)

    monkeypatch.setattr(*hooked, work_while_the_other_command_runs)
    capsys.readouterr()
    assert satic_main(argv) == 2
    err = capsys.readouterr().err
    assert "appeared while this command ran" in err and "Traceback" not in err
    if command == "caption":  # ours holds the file of the captions decoded so far: theirs keeps none, and says so
        assert (f"note: another command is captioning to {out} and keeps its progress in {out}.partial.jsonl; "
                "this one keeps none") in err
    assert {p: p.read_bytes() for p in (out.iterdir() if out.is_dir() else [out])} == others[0]
    assert not [p for p in out.parent.rglob(".satic-tmp-*")]
    if command != "score":
        assert satic_main(argv + ["--overwrite"]) == 0  # said: replaced
        assert {p: p.read_bytes() for p in (out.iterdir() if out.is_dir() else [out])} != others[0]


def test_caption_on_a_full_disk_keeps_whole_batches_and_goes_on_from_them(dataset, checkpoint, tmp_path, capsys):
    """The file of the captions so far refused part way (a full disk, here the file size limit): one line naming
    it, the file cut back to its last whole batch; with room again the same command goes on from there, to the
    captions of an uninterrupted run."""
    from processes import failed_on_a_full_disk, satic_with_file_size_limit

    args = ["caption", "--checkpoint", str(checkpoint), "--features", str(dataset.data_dir / "feats_att"),
            "--batch-size", "3"]
    assert satic_main([*args, "--out", str(tmp_path / "straight.json")]) == 0
    out = tmp_path / "caps.json"
    done = satic_with_file_size_limit([*args, "--out", str(out)], 1024)
    kept = tmp_path / "caps.json.partial.jsonl"
    assert failed_on_a_full_disk(done, "caption", kept), done.stderr[-3000:]
    assert not out.exists() and kept.read_bytes().endswith(b'"device_rng": null}\n')
    capsys.readouterr()
    assert satic_main([*args, "--out", str(out)]) == 0
    assert "going on from" in capsys.readouterr().err
    assert out.read_text() == (tmp_path / "straight.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.json", "straight.json"]


def test_the_timed_work_gives_the_splits_captions(dataset, checkpoint, test_ids, capsys):
    """What latency times (latency_batches, then caption_batches) is the captioning of the evaluated images: the
    same captions, each image with its own regions only. caption_split shows no progress bar unless asked."""
    from satic.evaluation.evaluate import caption_batches, latency_batches

    captioner = Captioner.load(checkpoint)
    data = open_data(captioner, dataset.data_dir)
    options = captioner.options(2)
    batches = latency_batches(captioner, data, "test", 2, 3)
    assert [feats.size(0) for feats, _ in batches] == [2, 1]
    assert not batches[0][1].all()  # padded regions: the masks matter
    _, captions = caption_split(captioner, data, "test", options, batch_size=2, max_images=3)
    assert capsys.readouterr().err == ""
    assert caption_batches(captioner, batches, options) == captions


def test_without_images_no_page_is_written_and_nothing_is_said(dataset, checkpoint, test_ids, tmp_path, capsys,
                                                              without_java):
    """A dataset whose images are elsewhere, without --image-root: the scores are written, no predictions.html;
    the note about --image-root is for a folder given with it."""
    data_dir = tmp_path / "data"
    shutil.copytree(dataset.data_dir, data_dir, symlinks=True, ignore=shutil.ignore_patterns("images"))
    out = tmp_path / "eval"
    result = evaluate_split(Captioner.load(checkpoint), data_dir, "test", max_images=2, latency_images=1,
                            latency_passes=1, out_dir=out, features=dataset.features)
    assert result.out_dir == out and result.num_images == 2
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.json", "scores.json"]
    assert "note:" not in capsys.readouterr().err


def test_grid_features_are_looked_for_in_the_data_folder_and_checked_against_the_checkpoint(dataset, tmp_path):
    """A checkpoint of grid features reads DATA/grid_att by default, named when it is missing, and refused when it
    was extracted at another image size."""
    import numpy as np

    from satic.data.stores import create_store
    from satic.model.checkpoint import FeatureSpec

    data_dir = tmp_path / "data"
    shutil.copytree(dataset.data_dir, data_dir, symlinks=True)
    vocab, _ = read_cocotalk(dataset.info_json)
    extractor = {"backbone": "efficientnet-lite0", "size": 64, "weights": None}
    model = SATModel(ModelConfig(vocab_size=len(vocab), group_size=2, num_layers=1, d_model=32, d_ff=64,
                                 num_heads=4, att_feat_size=20, max_positions=64)).eval()
    checkpoint = save_checkpoint(tmp_path / "grid", model, vocab, FeatureSpec("grid", extractor=extractor),
                                 extra={"decode": {"max_length": 8}})
    captioner = Captioner.load(checkpoint)
    with pytest.raises(SaticError, match=f"^no grid features at {re.escape(str(data_dir / 'grid_att'))}; give the "
                                         "feature store with --features$"):
        open_data(captioner, data_dir)
    rng = np.random.default_rng(0)
    with open_store(dataset.features) as store, create_store(data_dir / "grid_att", "npz") as writer:
        for image_id in store.ids():
            writer.add(image_id, rng.standard_normal((4, 20)).astype(np.float32))
    (data_dir / "grid_att.extractor.json").write_text(json.dumps({**extractor, "size": 96}))
    with pytest.raises(SaticError, match="were extracted with size 96 \\(checkpoint: 64\\)"):
        open_data(captioner, data_dir)
    (data_dir / "grid_att.extractor.json").write_text(json.dumps(extractor))
    assert open_data(captioner, data_dir).store.path == data_dir / "grid_att"


def test_latency_waits_for_the_captioners_device_around_each_timed_pass(dataset, checkpoint, monkeypatch):
    """GPU work is asynchronous: with every run on one device, the clock is read after that device's queued work."""
    from satic.evaluation import timing
    from satic.evaluation.evaluate import latency_batches, measure_latency

    captioner = Captioner.load(checkpoint)
    batches = latency_batches(captioner, open_data(captioner, dataset.data_dir), "test", 2, 2)
    waited = []
    monkeypatch.setattr(timing, "sync", waited.append)
    latency = measure_latency({"greedy": (captioner, batches, captioner.options()),
                               "beam": (captioner, batches, captioner.options(2))})
    assert waited == [captioner.device] * 12  # before and after each of 3 passes of 2 runs
    assert [(m.images, m.batch_size, m.beam_size) for m in latency.values()] == [(2, 2, 1), (2, 2, 2)]


def test_evaluate_split_from_python_is_greedy_and_quiet_by_default(dataset, checkpoint, capsys, monkeypatch,
                                                                   without_java):
    """Without options: the test split, greedy, batches of 50, no SPICE (which needs Java and its jars), the best
    of 3 timed passes, and no progress bar."""
    from satic.evaluation import metrics

    spice_looked_for = []
    monkeypatch.setattr(metrics, "spice_unavailable_reason", lambda: spice_looked_for.append(1) or "none here")
    result = evaluate_split(Captioner.load(checkpoint), dataset.data_dir, max_images=3, latency_images=1)
    assert {k: result.settings[k] for k in ("split", "beam_size", "batch_size")} == {
        "split": "test", "beam_size": 1, "batch_size": 50}
    assert len(result.latency.timing.seconds) == 3
    assert "SPICE" not in result.metrics and spice_looked_for == [] and capsys.readouterr().err == ""


def test_a_split_pass_yields_and_counts_the_images_split_image_ids_lists(dataset, checkpoint, test_ids, capsys):
    """decode_split captions the split's first max_images (None or negative: all; 0: none) in file order, one label
    caption per image unless asked, and its progress bar counts those images; split_image_ids lists the same ones."""
    from satic.evaluation.splits import decode_split, split_image_ids

    captioner = Captioner.load(checkpoint)
    data = open_data(captioner, dataset.data_dir)
    assert split_image_ids(data, "test") == test_ids
    for max_images, count in ((2, 2), (None, len(test_ids)), (-1, len(test_ids)), (0, 0), (99, len(test_ids))):
        passed = list(decode_split(captioner.decode, data, "test", captioner.options(), 3, max_images, progress=True))
        ids = [i for batch, _ in passed for i in batch.image_ids]
        assert ids == split_image_ids(data, "test", max_images) == test_ids[:count]
        bar = f"100% {count}/{count} [" if count else "0img ["  # tqdm's bar without a total
        assert f"captioning test: {bar}" in capsys.readouterr().err, max_images
    (batch, result), = decode_split(captioner.decode, data, "test", captioner.options())
    assert len(batch.image_ids) == len(test_ids) and batch.labels.size(0) == len(test_ids) == result.seq.size(0)
