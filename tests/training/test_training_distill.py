"""`satic distill` writes the teacher's beam captions for training images in the reference label format."""
import itertools
import re

import numpy as np
import pytest
import torch

from satic.cli import main as satic_main
from satic.cli.distill import main
from satic.data.dataset import CaptionData
from satic.data.labels import read_label_h5
from satic.decoding import DecodeOptions, decode
from satic.errors import SaticError
from satic.model.checkpoint import load_checkpoint
from satic.training.distill import make_seqkd_labels
from satic.training.trainer import train
from training_helpers import make_config


def test_distill_labels_format(tiny_data, tmp_path, capsys):
    train(make_config(tiny_data, tmp_path / "teacher", max_iters=30, **{"optim.noam_warmup": 10}))
    teacher = tmp_path / "teacher" / "last"
    out = tmp_path / "seqkd_label.h5"
    assert main(["--teacher", str(teacher), "--data", str(tiny_data), "--out", str(out), "--beam-size", "3",
                 "--batch-size", "7", "--max-length", "8"]) == 0
    seqkd, human = read_label_h5(out), read_label_h5(tiny_data / "cocotalk_label.h5")
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    train_images = set(data.split_indices("train"))
    model = load_checkpoint(teacher).model
    distilled = 0
    for index in range(human.num_images):
        rows = seqkd.captions(index)
        if index not in train_images:
            assert np.array_equal(rows, human.captions(index))
            continue
        regions = torch.from_numpy(data.regions(index))[None]
        seq = decode(model, regions, None, DecodeOptions(beam_size=3, n_best=3, max_length=8)).seq.numpy()
        beams = [s[: int(np.argmax(s == 0))] if (s == 0).any() else s for s in seq]  # best first
        beams = [b for b in beams if len(b)]
        if not beams:  # all teacher captions empty: the human ones stay
            assert np.array_equal(rows, human.captions(index))
            continue
        distilled += 1
        assert rows.shape == (len(beams), human.seq_length)  # every finished beam, as the reference
        for row, words in zip(rows, beams):
            assert np.array_equal(row[: len(words)], words) and not row[len(words):].any()
    assert distilled > len(train_images) // 2
    assert seqkd.labels.dtype == np.uint32
    assert np.array_equal(seqkd.label_length, (seqkd.labels > 0).sum(1))

    # an existing --out is replaced only with --overwrite, and the data's own labels never
    args = ["distill", "--teacher", str(teacher), "--data", str(tiny_data), "--beam-size", "1", "--max-length", "8"]
    written, human_bytes = out.read_bytes(), (tiny_data / "cocotalk_label.h5").read_bytes()
    capsys.readouterr()
    assert satic_main([*args, "--out", str(out)]) == 2
    assert f"--out {out} already exists; give a new path, or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == written
    for extra in ([], ["--overwrite"]):
        assert satic_main([*args, "--out", str(tiny_data / "cocotalk_label.h5"), *extra]) == 2
        assert "whose human captions the distilled labels are made from" in capsys.readouterr().err
    assert (tiny_data / "cocotalk_label.h5").read_bytes() == human_bytes
    assert satic_main([*args, "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != written  # beam 1 instead of beam 3
    # --n-best 1 keeps each image's best beam only; more than the beam is refused
    assert satic_main([*args, "--beam-size", "3", "--n-best", "1", "--out", str(out), "--overwrite"]) == 0
    assert all(len(read_label_h5(out).captions(i)) == 1 for i in train_images
               if not np.array_equal(read_label_h5(out).captions(i), human.captions(i)))
    assert satic_main([*args, "--beam-size", "2", "--n-best", "3", "--out", str(out), "--overwrite"]) == 2
    assert "--n-best 3 is more than --beam-size 2" in capsys.readouterr().err


def test_seqkd_labels_drop_empty_teacher_captions_and_cut_the_rest():
    from satic.data.labels import LabelData
    from satic.training.distill import seqkd_label_data

    human = LabelData(np.array([[1, 2, 0, 0], [3, 0, 0, 0], [4, 4, 0, 0], [5, 0, 0, 0]], np.uint32),
                      np.array([1, 3, 4], np.uint32), np.array([2, 3, 4], np.uint32), np.array([2, 1, 2, 1], np.uint32))
    teacher = {0: [np.array([], np.int64), np.array([7, 8, 9, 10, 11])],  # an empty one is dropped, a long one cut
               1: [np.array([], np.int64)]}  # all empty: the human captions stay
    labels, kept_human = seqkd_label_data(human, teacher)
    assert kept_human == 1
    np.testing.assert_array_equal(labels.labels, [[7, 8, 9, 10], [4, 4, 0, 0], [5, 0, 0, 0]])
    np.testing.assert_array_equal(labels.label_start_ix, [1, 2, 3])
    np.testing.assert_array_equal(labels.label_end_ix, [1, 2, 3])
    np.testing.assert_array_equal(labels.label_length, [4, 2, 1])


def tiny_teacher(tiny_data, path):
    """An untrained checkpoint on the data's vocabulary (the labels' content is not what these tests check)."""
    from satic.data.labels import read_cocotalk
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import save_checkpoint
    from training_helpers import TINY_MODEL

    vocab, _ = read_cocotalk(tiny_data / "cocotalk.json")
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), att_feat_size=12, **TINY_MODEL))
    return save_checkpoint(path, model, vocab), model


def test_teacher_captions_end_before_the_end_token(tiny_data, tmp_path):
    from satic.training.distill import teacher_captions

    _, model = tiny_teacher(tiny_data, tmp_path / "teacher")
    with torch.no_grad():
        model.generator.bias[0] = 100.0  # the end token first: the best beam is empty, the second one word
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    captions = teacher_captions(model.eval(), data, 2, 16, 8, 2, torch.device("cpu"), progress=False)
    assert sorted(captions) == data.split_indices("train")
    assert all(len(rows) == 2 and len(rows[0]) == 0 and len(rows[1]) > 0 for rows in captions.values())
    assert all(0 not in caption for rows in captions.values() for caption in rows)  # cut before the end token


def test_distill_reports_kept_human_captions_and_never_replaces_a_file_written_meanwhile(tiny_data, tmp_path,
                                                                                          monkeypatch):
    from satic.errors import SaticError
    from satic.training import distill

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    train_images = data.split_indices("train")
    fake = {index: [np.array([3, 4])] for index in train_images}
    fake[train_images[0]] = [np.array([], np.int64)]
    monkeypatch.setattr(distill, "teacher_captions", lambda *args, **kwargs: fake)
    report = distill.make_seqkd_labels(teacher, tiny_data, tmp_path / "kd.h5", progress=False)
    assert (report.images, report.kept_human) == (len(train_images), 1)
    human = read_label_h5(tiny_data / "cocotalk_label.h5")
    np.testing.assert_array_equal(read_label_h5(tmp_path / "kd.h5").captions(train_images[0]),
                                  human.captions(train_images[0]))

    out = tmp_path / "other.h5"

    def another_run_finishes_first(*args, **kwargs):
        out.write_text("theirs")
        return fake

    monkeypatch.setattr(distill, "teacher_captions", another_run_finishes_first)
    with pytest.raises(SaticError, match=f"{out} appeared while this command ran"):
        distill.make_seqkd_labels(teacher, tiny_data, out, progress=False)
    assert out.read_text() == "theirs"


def test_distill_never_writes_onto_the_datas_labels_through_another_path(tiny_data, tmp_path):
    from satic.errors import SaticError
    from satic.training.distill import make_seqkd_labels

    (tmp_path / "link").symlink_to(tiny_data, target_is_directory=True)
    before = (tiny_data / "cocotalk_label.h5").read_bytes()
    with pytest.raises(SaticError, match="is the label file of .*whose human captions the distilled labels"):
        make_seqkd_labels(tmp_path / "no-teacher", tiny_data, tmp_path / "link" / "cocotalk_label.h5", overwrite=True)
    assert (tiny_data / "cocotalk_label.h5").read_bytes() == before


def test_distill_never_writes_onto_a_file_it_reads(tiny_data, tmp_path):
    """--out --overwrite onto the teacher's weights or configuration, the data's info file or a file of the feature
    store would replace it with the labels."""
    import shutil

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for out, option in [(teacher / "model.safetensors", "--teacher"), (teacher / "config.json", "--teacher"),
                        (data / "cocotalk.json", "--data"), (data / "feats_att" / "1.npz", "--features")]:
        before = out.read_bytes()
        assert satic_main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                           "--overwrite"]) == 2
        message = f"--out {out} is the {option} file {out}, which this command reads; give --out another path"
        with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
            make_seqkd_labels(teacher, data, out, overwrite=True, progress=False)
        assert out.read_bytes() == before
    labels = teacher / "labels.h5"  # beside the teacher's files, but none of them
    labels.write_bytes(b"an earlier run's labels")
    make_seqkd_labels(teacher, data, labels, overwrite=True, progress=False)
    assert read_label_h5(labels).num_images == read_label_h5(data / "cocotalk_label.h5").num_images


def test_a_beam_wider_than_the_vocabulary_is_refused_before_its_cache_is_made(tiny_data, tmp_path):
    """A beam of 10**11 would first ask for its key/value cache (exabytes)."""
    teacher, model = tiny_teacher(tiny_data, tmp_path / "teacher")
    message = f"{10**11} beams per group exceed the {model.config.num_outputs} outputs of the model"
    with pytest.raises(SaticError, match=f"^{re.escape(message)}"):
        make_seqkd_labels(teacher, tiny_data, tmp_path / "kd.h5", beam_size=10**11, progress=False)
    assert not (tmp_path / "kd.h5").exists()


def test_beams_whose_cache_outgrows_the_memory_are_refused_before_decoding(tiny_data, tmp_path, monkeypatch):
    """distill decodes through decode(), which checks the key/value cache of a batch's beams against the device's
    memory, as for a Captioner: a --batch-size x --beam-size too large is named, not a failed allocation."""
    from satic.model.transformer import model_bytes

    teacher, model = tiny_teacher(tiny_data, tmp_path / "teacher")
    room = model_bytes(model.config)  # the teacher fits, to the byte; its beams' cache does not
    monkeypatch.setattr("satic.device.memory_bytes", lambda device: room)
    with pytest.raises(SaticError, match=r"^decoding \d+ image\(s\) x 5 rows each \(beam_size or sample_n\) needs, "
                                         r"for its key/value cache, [\d,.]+ GiB, more than the [\d,.]+ GiB of cpu; "
                                         r"lower"):
        make_seqkd_labels(teacher, tiny_data, tmp_path / "kd.h5", beam_size=5, progress=False)
    assert not (tmp_path / "kd.h5").exists()


def test_a_teacher_of_another_feature_size_is_refused_naming_the_store_before_decoding(tiny_data, tmp_path):
    from satic.data.labels import read_cocotalk
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import save_checkpoint
    from training_helpers import TINY_MODEL

    vocab, _ = read_cocotalk(tiny_data / "cocotalk.json")
    teacher = save_checkpoint(tmp_path / "teacher", SATModel(ModelConfig(vocab_size=len(vocab), att_feat_size=16,
                                                                         **TINY_MODEL)), vocab)
    message = (f"the features in {tiny_data / 'feats_att'} have 12 numbers per region but the teacher {teacher} was "
               "trained on 16-dim bottom-up features; give --features of that kind, or a teacher trained on these")
    with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
        make_seqkd_labels(teacher, tiny_data, tmp_path / "kd.h5", progress=False)
    assert not (tmp_path / "kd.h5").exists() and not (tmp_path / "kd.h5.partial.npz").exists()


def test_a_teacher_of_another_vocabulary_is_refused_before_anything_is_written(tiny_data, tmp_path):
    """Same size, words in another order: its word ids would mean other words in these labels."""
    from satic.data.labels import read_cocotalk
    from satic.data.vocab import Vocabulary
    from satic.errors import SaticError
    from satic.model.checkpoint import save_checkpoint
    from satic.training.distill import make_seqkd_labels

    _, model = tiny_teacher(tiny_data, tmp_path / "teacher")
    vocab, _ = read_cocotalk(tiny_data / "cocotalk.json")
    teacher = save_checkpoint(tmp_path / "reversed", model, Vocabulary(vocab.words[::-1]))
    message = (f"the teacher {teacher} was trained with another vocabulary than {tiny_data / 'cocotalk.json'}; "
               "distil with a teacher trained on this data")
    with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
        make_seqkd_labels(teacher, tiny_data, tmp_path / "kd.h5", progress=False)
    assert not (tmp_path / "kd.h5").exists()


def test_distill_decodes_with_the_engine_of_satic_eval(tiny_data, tmp_path, monkeypatch):
    """The teacher's beams come from a Decoder of it (on the CPU the native beam search, which `satic eval` decodes
    with), and equal those of the bare model's Python loop, batch for batch."""
    from satic.data.labels import read_cocotalk
    from satic.decoding.engine import Decoder
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import save_checkpoint
    from satic.training import distill
    from training_helpers import TINY_MODEL

    vocab, _ = read_cocotalk(tiny_data / "cocotalk.json")
    torch.manual_seed(1)
    model = SATModel(ModelConfig(vocab_size=len(vocab), att_feat_size=12, **TINY_MODEL)).eval()
    teacher = save_checkpoint(tmp_path / "teacher", model, vocab)
    real, used = distill.teacher_captions, []

    def spy(model, *args, **kwargs):
        used.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(distill, "teacher_captions", spy)
    assert main(["--teacher", str(teacher), "--data", str(tiny_data), "--out", str(tmp_path / "kd.h5"),
                 "--beam-size", "3", "--max-length", "8", "--batch-size", "7"]) == 0
    assert isinstance(used[0], Decoder) and used[0].backend == "native"
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    settings = dict(beam_size=3, batch_size=7, max_length=8, n_best=3, device=torch.device("cpu"), progress=False)
    engine, loop = real(used[0], data, **settings), real(model, data, **settings)
    assert engine.keys() == loop.keys() and len(loop) == len(data.split_indices("train"))
    assert all(len(engine[i]) == len(loop[i]) == 3 and all(map(np.array_equal, engine[i], loop[i])) for i in loop)


def test_distill_decodes_with_the_teachers_max_length_unless_told(tiny_data, tmp_path, monkeypatch):
    """The reference's eval.py --seq_kd decodes with the teacher's max_length (its infos; a --max_length that
    differs is refused), which `satic import-reference` records as the checkpoint's decode max_length; so are its
    length_penalty and remove_bad_endings. --max-length, --length-penalty and --[no-]remove-bad-endings override
    them."""
    from satic.data.labels import read_cocotalk
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import save_checkpoint
    from satic.training import distill
    from training_helpers import TINY_MODEL

    vocab, _ = read_cocotalk(tiny_data / "cocotalk.json")
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(vocab), att_feat_size=12, **TINY_MODEL))
    imported = save_checkpoint(tmp_path / "imported", model, vocab, extra={"decode": {"max_length": 12}})
    plain = save_checkpoint(tmp_path / "plain", model, vocab)
    # the reference's eval.py also decodes with the infos' length_penalty and remove_bad_endings
    tuned = save_checkpoint(tmp_path / "tuned", model, vocab,
                            extra={"decode": {"max_length": 12, "length_penalty": "avg_1", "remove_bad_endings": True}})
    calls, threads = [], []

    def record(model, data, beam_size, batch_size, max_length, n_best, device, progress, length_penalty="",
               bad_endings=frozenset(), **going_on):
        calls.append((max_length, length_penalty, {vocab.words[i - 1] for i in bad_endings}))
        threads.append(torch.get_num_threads())
        return {index: [np.array([3, 4])] for index in data.split_indices("train")}

    monkeypatch.setattr(distill, "teacher_captions", record)
    runs = [(imported, []), (imported, ["--max-length", "8"]), (plain, []), (tuned, []),
            (tuned, ["--length-penalty", "none", "--no-remove-bad-endings"]),
            (plain, ["--length-penalty", "wu_0.9", "--remove-bad-endings"]), (tuned, ["--length-penalty", "avg_2"])]
    before = torch.get_num_threads()  # one in these tests
    try:
        for n, (teacher, extra) in enumerate(runs):
            assert main(["--teacher", str(teacher), "--data", str(tiny_data), "--out", str(tmp_path / f"kd{n}.h5"),
                         *extra, *(["--threads", "2"] if n == len(runs) - 1 else [])]) == 0
    finally:
        torch.set_num_threads(before)
    assert threads == [before] * (len(runs) - 1) + [2]  # --threads: torch's threads for the decoding
    from satic.decoding.options import BAD_ENDINGS
    bad = BAD_ENDINGS & set(vocab.words)
    assert bad and calls == [(12, "", set()), (8, "", set()), (20, "", set()), (12, "avg_1", bad), (12, "", set()),
                             (20, "wu_0.9", bad), (12, "avg_2", bad)]


def test_teacher_captions_lose_bad_endings_as_the_references_decode_sequence(tiny_data, tmp_path):
    """remove_bad_endings: trailing bad-ending words are cut, unless the caption is made only of them."""
    from satic.training.distill import teacher_captions

    _, model = tiny_teacher(tiny_data, tmp_path / "teacher")
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    args = (model.eval(), data, 3, 16, 8, 3, torch.device("cpu"))
    plain = teacher_captions(*args, progress=False)
    last_words = {int(c[-1]) for rows in plain.values() for c in rows if len(c)}
    bad = frozenset(sorted(last_words)[: max(1, len(last_words) // 2)])
    cut = teacher_captions(*args, progress=False, bad_endings=bad)
    changed = 0
    for index, rows in plain.items():
        for full, got in zip(rows, cut[index]):
            trailing = len(list(itertools.takewhile(lambda w: int(w) in bad, reversed(full.tolist()))))
            expected = full if trailing == len(full) else full[: len(full) - trailing]
            np.testing.assert_array_equal(got, expected)
            changed += len(got) != len(full)
    assert changed


def test_an_imported_teacher_keeps_the_decoding_options_the_references_eval_py_takes_from_its_infos(
        import_reference, tmp_path):
    assert import_reference(1, tmp_path / "teacher", caption_model="transformer", max_length=12,
                            length_penalty="avg_1", remove_bad_endings=1) == 0
    assert load_checkpoint(tmp_path / "teacher").extra["decode"] == {
        "max_length": 12, "length_penalty": "avg_1", "remove_bad_endings": True}
    # and they go back into the infos on export
    assert satic_main(["export-reference", "--checkpoint", str(tmp_path / "teacher"), "--out", str(tmp_path / "ref"),
                       "--id", "teacher"]) == 0
    from satic.model.reference import read_reference_infos

    opt = read_reference_infos(tmp_path / "ref" / "infos_teacher-best.pkl")["opt"]
    assert (opt.max_length, opt.length_penalty, opt.remove_bad_endings) == (12, "avg_1", 1)


def counting_decodes(monkeypatch, stop_at: int | None = None) -> list[int]:
    """Wrap the teacher's decode: the batch sizes it decodes, and a Ctrl-C at its call stop_at."""
    from satic.evaluation import splits

    real, sizes = splits.model_decode, []

    def model_decode(model, device):
        decode = real(model, device)

        def counted(att_feats, att_masks, options):
            if len(sizes) == stop_at:
                raise KeyboardInterrupt
            sizes.append(len(att_feats))
            return decode(att_feats, att_masks, options)
        return counted

    monkeypatch.setattr(splits, "model_decode", model_decode)
    return sizes


def test_a_stopped_distill_goes_on_from_its_captions_to_the_same_labels(tiny_data, tmp_path, monkeypatch, capsys):
    from satic.training.distill import make_seqkd_labels

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    options = {"beam_size": 2, "batch_size": 3, "max_length": 8, "progress": False}
    make_seqkd_labels(teacher, tiny_data, tmp_path / "straight.h5", **options)
    out, partial = tmp_path / "kd.h5", tmp_path / "kd.h5.partial.npz"
    with monkeypatch.context() as patch:
        counting_decodes(patch, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            make_seqkd_labels(teacher, tiny_data, out, **options)
    total = len(CaptionData.from_dir(tiny_data, tiny_data / "feats_att").split_indices("train"))
    assert not out.exists() and partial.exists()
    assert f"kept the captions of 6 of {total} training images in {partial}" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        sizes = counting_decodes(patch)
        make_seqkd_labels(teacher, tiny_data, out, **options)
    assert sum(sizes) == total - 6 and not partial.exists()
    assert f"going on from {partial}: 6 of {total} training images captioned" in capsys.readouterr().err
    got, expected = read_label_h5(out), read_label_h5(tmp_path / "straight.h5")
    for name in ("labels", "label_start_ix", "label_end_ix", "label_length"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


def test_a_stopped_distill_is_not_continued_with_other_settings(tiny_data, tmp_path, monkeypatch):
    from satic.errors import SaticError
    from satic.training.distill import make_seqkd_labels

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    out, partial = tmp_path / "kd.h5", tmp_path / "kd.h5.partial.npz"
    with monkeypatch.context() as patch:
        counting_decodes(patch, stop_at=1)
        with pytest.raises(KeyboardInterrupt):
            make_seqkd_labels(teacher, tiny_data, out, beam_size=2, batch_size=3, max_length=8, progress=False)
    with pytest.raises(SaticError, match=re.escape(f"{partial} holds the captions of an interrupted `satic distill` "
                                                   "with other settings (batch_size, beam_size, n_best differ); run it "
                                                   f"again as it was to finish it, or delete {partial} or give "
                                                   "--overwrite")):
        make_seqkd_labels(teacher, tiny_data, out, beam_size=3, batch_size=4, max_length=8, progress=False)
    with monkeypatch.context() as patch:
        sizes = counting_decodes(patch)
        make_seqkd_labels(teacher, tiny_data, out, beam_size=3, batch_size=4, max_length=8, progress=False,
                          overwrite=True)
    assert sum(sizes) == len(CaptionData.from_dir(tiny_data, tiny_data / "feats_att").split_indices("train"))
    assert out.exists() and not partial.exists()


@pytest.mark.parametrize("held", [b"not an npz", b"", "zip"], ids=["text", "empty", "another-npz"])
def test_a_partial_file_satic_did_not_write_is_neither_read_nor_replaced(tiny_data, tmp_path, monkeypatch, held):
    """A file of the partial file's name that does not hold save_partial's arrays is refused before any decoding,
    --overwrite included, and kept as it was."""
    from satic.errors import SaticError
    from satic.training.distill import make_seqkd_labels

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    out, partial = tmp_path / "kd.h5", tmp_path / "kd.h5.partial.npz"
    if held == "zip":
        np.savez(partial, settings=np.array("{}"), words=np.arange(3))
    else:
        partial.write_bytes(held)
    before = partial.read_bytes()
    for overwrite in (False, True):
        with monkeypatch.context() as patch:
            sizes = counting_decodes(patch)
            with pytest.raises(SaticError, match=f"^{re.escape(str(partial))} is not a file of the captions satic "
                                                 "keeps for an interrupted `satic distill`; move it away$"):
                make_seqkd_labels(teacher, tiny_data, out, beam_size=2, batch_size=3, max_length=8, progress=False,
                                  overwrite=overwrite)
        assert sizes == [] and not out.exists() and partial.read_bytes() == before


def test_a_stopped_distill_is_not_continued_on_features_written_again(tiny_data, tmp_path, monkeypatch):
    """The features are not read twice to check them: a store written again (a new folder renamed into place,
    as satic writes one) or given an entry more is a store of other features, and is named."""
    import shutil

    from satic.errors import SaticError
    from satic.training.distill import make_seqkd_labels

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    features = tmp_path / "feats_att"
    shutil.copytree(tiny_data / "feats_att", features)
    options = {"features": features, "beam_size": 2, "batch_size": 3, "max_length": 8, "progress": False}
    out = tmp_path / "kd.h5"
    with monkeypatch.context() as patch:
        counting_decodes(patch, stop_at=1)
        with pytest.raises(KeyboardInterrupt):
            make_seqkd_labels(teacher, tiny_data, out, **options)
    shutil.copytree(features, tmp_path / "new_att")
    shutil.rmtree(features)
    (tmp_path / "new_att").rename(features)
    with pytest.raises(SaticError, match=r"with other settings \(features_version differ\)"):
        make_seqkd_labels(teacher, tiny_data, out, **options)


def test_a_stopped_distill_goes_on_where_the_same_store_is_mounted_anew(tiny_data, tmp_path, monkeypatch):
    """A network folder mounted on another machine, or again after a restart, has another device number: the
    same files, so the same settings, and the run goes on there."""
    import types
    from pathlib import Path

    from satic.training.distill import run_settings

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    features = tiny_data / "feats_att"
    before = run_settings(teacher, tiny_data, tiny_data / "cocotalk.json", features, beam_size=2)
    stat = Path.stat

    def remounted(self, **kwargs):
        result = stat(self, **kwargs)
        if self != features:
            return result
        fields = {name: getattr(result, name) for name in dir(result) if name.startswith("st_")}
        return types.SimpleNamespace(**{**fields, "st_dev": result.st_dev + 1})

    monkeypatch.setattr(Path, "stat", remounted)
    assert run_settings(teacher, tiny_data, tiny_data / "cocotalk.json", features, beam_size=2) == before


KILLED_AT_THE_THIRD_BATCH = """import os
import signal
import sys

from satic.cli import main
from satic.evaluation import splits
from satic.training import distill

distill.SAVE_EVERY_S = 0  # kept after every batch
real, calls = splits.model_decode, []


def model_decode(model, device):
    decode = real(model, device)

    def killed_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return decode(*args)
    return killed_at_the_third


splits.model_decode = model_decode
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_distill_goes_on_from_the_captions_it_kept(tiny_data, tmp_path):
    """SIGKILL leaves no chance to save: the captions kept after each batch (every SAVE_EVERY_S) are what remain."""
    import os
    import signal
    import subprocess
    import sys

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    args = ["distill", "--teacher", str(teacher), "--data", str(tiny_data), "--beam-size", "2", "--batch-size", "3",
            "--max-length", "8"]
    assert satic_main([*args, "--out", str(tmp_path / "straight.h5")]) == 0
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AT_THE_THIRD_BATCH)
    out = tmp_path / "kd.h5"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    killed = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and (tmp_path / "kd.h5.partial.npz").exists()
    assert satic_main([*args, "--out", str(out)]) == 0
    assert not (tmp_path / "kd.h5.partial.npz").exists()
    got, expected = read_label_h5(out), read_label_h5(tmp_path / "straight.h5")
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.label_start_ix, expected.label_start_ix)


def middle_of_largest_member(path):
    """The offset of the middle byte of an uncompressed zip's largest member's data."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    local = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2


def test_a_damaged_partial_file_is_refused_with_its_name(tiny_data, tmp_path, monkeypatch):
    """A truncated or empty OUT.partial.npz (a full disk, a copy cut short) is refused, not a traceback."""
    from satic.errors import SaticError
    from satic.training.distill import make_seqkd_labels

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    out, partial = tmp_path / "kd.h5", tmp_path / "kd.h5.partial.npz"
    options = {"beam_size": 2, "batch_size": 3, "max_length": 8, "progress": False}
    with monkeypatch.context() as patch:
        counting_decodes(patch, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            make_seqkd_labels(teacher, tiny_data, out, **options)
    whole = partial.read_bytes()
    flipped = bytearray(whole)
    flipped[middle_of_largest_member(partial)] ^= 0xFF  # in data the zip's CRC covers, whatever the file's length
    for damaged, said in ((whole[: len(whole) // 2], " is not a file of the captions satic keeps"),
                          (b"", " is not a file of the captions satic keeps"),
                          (bytes(flipped), ": not the captions of an interrupted")):
        partial.write_bytes(damaged)
        with pytest.raises(SaticError, match=f"^{re.escape(str(partial) + said)}"):
            make_seqkd_labels(teacher, tiny_data, out, **options)
        assert not out.exists() and partial.read_bytes() == damaged
    make_seqkd_labels(teacher, tiny_data, out, **options, overwrite=True)  # satic's file, damaged: replaced
    assert out.exists() and not partial.exists()


def test_distill_removes_the_partial_files_temp_that_a_killed_run_left(tiny_data, tmp_path, monkeypatch):
    """SIGKILL while OUT.partial.npz is written leaves its temporary file; the next run removes it."""
    from satic.training import distill

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    dead = 2 ** 22 + 12345  # above Linux's largest process id: no process has it
    stale = tmp_path / f".satic-tmp-{dead}-kd.h5.partial.npz.k3j9_x.tmp"
    stale.write_bytes(b"half a partial file")
    monkeypatch.setattr(distill, "teacher_captions", lambda model, data, *args, **kwargs: {
        index: [np.array([3, 4])] for index in data.split_indices("train")})
    distill.make_seqkd_labels(teacher, tiny_data, tmp_path / "kd.h5", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd.h5", "teacher"]


def test_a_partial_path_that_is_a_folder_is_refused_before_decoding(tiny_data, tmp_path, monkeypatch):
    """Not satic's file: neither read nor removed, and refused before the labels are made, --overwrite or not."""
    from satic.errors import SaticError
    from satic.training.distill import make_seqkd_labels

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    out, partial = tmp_path / "kd.h5", tmp_path / "kd.h5.partial.npz"
    partial.mkdir()
    (partial / "mine.txt").write_text("the user's")
    sizes = counting_decodes(monkeypatch)
    for overwrite in (False, True):
        with pytest.raises(SaticError, match=f"^the file of the captions decoded so far {re.escape(str(partial))} "
                                             "is a directory; move it away$"):
            make_seqkd_labels(teacher, tiny_data, out, beam_size=2, batch_size=3, max_length=8, progress=False,
                              overwrite=overwrite)
    assert sizes == [] and not out.exists() and (partial / "mine.txt").read_text() == "the user's"


def test_a_stopped_distill_is_not_continued_on_data_prepared_anew(tiny_data, tmp_path, monkeypatch):
    """The same folder with another info file (images or splits made anew): the captions kept are of other images."""
    import json
    import shutil

    from satic.errors import SaticError
    from satic.training.distill import make_seqkd_labels

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, symlinks=True)
    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    options = {"beam_size": 2, "batch_size": 3, "max_length": 8, "progress": False,
               "features": tiny_data / "feats_att"}
    with monkeypatch.context() as patch:
        counting_decodes(patch, stop_at=1)
        with pytest.raises(KeyboardInterrupt):
            make_seqkd_labels(teacher, data, tmp_path / "kd.h5", **options)
    info = json.loads((data / "cocotalk.json").read_text())
    info["images"] = info["images"][1:] + info["images"][:1]  # another order: other images in the first batch
    (data / "cocotalk.json").write_text(json.dumps(info))
    with pytest.raises(SaticError, match=r"with other settings \(images differ\)"):
        make_seqkd_labels(teacher, data, tmp_path / "kd.h5", **options)


PARTIAL_SETTINGS = {"batch_size": 2, "beam_size": 2, "n_best": 2, "train_images": 5}
PARTIAL_SPLIT, PARTIAL_VOCAB = [7, 9, 10, 12, 13], 9  # the training images' indices, the words


def partial_file(path, settings=None, images=2, index=(7, 7, 9, 9), length=(2, 1, 3, 0), words=(4, 5, 6, 4, 5, 6)):
    """An OUT.partial.npz as save_partial lays it out, each array given (a tuple as save_partial's int64s)."""
    import json

    def array(given):
        return given if isinstance(given, np.ndarray) else np.array(given, np.int64)

    np.savez(path, settings=np.array(json.dumps(PARTIAL_SETTINGS if settings is None else settings)),
             images=np.int64(images), index=array(index), length=array(length), words=array(words))
    return path


def test_kept_captions_are_read_back_as_saved(tmp_path):
    from satic.training.distill import read_partial, save_partial

    captions = {7: [np.array([4, 5]), np.array([6])], 9: [np.array([4, 5, 6]), np.array([], np.int64)], 8: []}
    save_partial(tmp_path / "kd.h5.partial.npz", PARTIAL_SETTINGS, [7, 9], captions)
    images, read = read_partial(tmp_path / "kd.h5.partial.npz", PARTIAL_SETTINGS, PARTIAL_SPLIT, PARTIAL_VOCAB)
    assert images == 2 and sorted(read) == [7, 9]
    assert [c.tolist() for c in read[7]] == [[4, 5], [6]] and [c.tolist() for c in read[9]] == [[4, 5, 6], []]
    last = partial_file(tmp_path / "last.npz", images=5, index=np.repeat(PARTIAL_SPLIT, 2), length=[1] * 10,
                        words=[4] * 10)
    images, read = read_partial(last, PARTIAL_SETTINGS, PARTIAL_SPLIT, PARTIAL_VOCAB)
    assert images == 5  # the whole split, its last batch short


@pytest.mark.parametrize("arrays", [{"images": 0}, {"images": 6}, {"images": 3}, {"index": (7, 7)},
                                    {"length": (2, 1, 2, 0)}, {"length": (4, -1, 3, 0)},
                                    {"index": (7, 7, 10, 10)}, {"index": (7, 9, 9, 9)}, {"index": (9, 9, 7, 7)},
                                    {"words": (4, 5, 6, 4, 5, 10)}, {"words": (4, 5, 0, 4, 5, 6)},
                                    {"words": (4, 5, -6, 4, 5, 6)}, {"words": np.full(6, 4.5)},
                                    {"words": np.full((2, 3), 4)}, {"length": np.array([2, 1, 3, 0], float)}],
                         ids=["none", "more-than-the-split", "part-of-a-batch", "an-index-short", "a-length-short",
                              "a-negative-length", "another-image", "an-image-short", "out-of-order",
                              "a-word-past-the-vocabulary", "the-end-token", "a-negative-word", "fractional-words",
                              "words-in-rows", "fractional-lengths"])
def test_kept_captions_whose_arrays_do_not_fit_together_are_refused(tmp_path, arrays):
    from satic.training.distill import UnusablePartial, read_partial

    path = partial_file(tmp_path / "kd.h5.partial.npz", **arrays)
    with pytest.raises(UnusablePartial, match=f"^{re.escape(str(path))}: its arrays do not fit together"):
        read_partial(path, PARTIAL_SETTINGS, PARTIAL_SPLIT, PARTIAL_VOCAB)


@pytest.mark.parametrize("field, value", [(10, 99), (8, 1)], ids=["unknown-compression", "encrypted"])
def test_kept_captions_whose_zip_records_cannot_be_read_are_refused(tmp_path, field, value):
    """A damaged zip directory entry (a compression method or flag zipfile lacks) is one refusal naming the file."""
    from satic.training.distill import UnusablePartial, kept_by_distill, read_partial

    path = partial_file(tmp_path / "kd.h5.partial.npz")
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first member's central directory entry
    data[entry + field:entry + field + 2] = value.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    assert kept_by_distill(path)  # satic's file, its member names intact
    with pytest.raises(UnusablePartial, match=f"^{re.escape(str(path))}: not the captions of an interrupted `satic "
                                              "distill`"):
        read_partial(path, PARTIAL_SETTINGS, PARTIAL_SPLIT, PARTIAL_VOCAB)


def test_kept_captions_of_other_settings_are_refused_by_every_setting_that_differs(tmp_path):
    """A setting the kept file has and this run lacks (one of another satic version) differs as well."""
    from satic.training.distill import UnusablePartial, read_partial

    path = partial_file(tmp_path / "kd.h5.partial.npz", settings={**PARTIAL_SETTINGS, "beam_size": 3, "older": 1})
    with pytest.raises(UnusablePartial, match=r"with other settings \(beam_size, older differ\)"):
        read_partial(path, PARTIAL_SETTINGS, PARTIAL_SPLIT, PARTIAL_VOCAB)
    partial_file(path, settings=[PARTIAL_SETTINGS])
    with pytest.raises(UnusablePartial, match=f"^{re.escape(str(path))}: not the captions of an interrupted `satic "
                                              r"distill` \(its settings are not a mapping\)"):
        read_partial(path, PARTIAL_SETTINGS, PARTIAL_SPLIT, PARTIAL_VOCAB)


def test_what_the_kept_captions_depend_on(tmp_path):
    """The teacher's weights and configuration, and the features' file changed in place (same size, same inode),
    change the settings; a file of the teacher's folder that is neither does not."""
    import os

    from satic.training.distill import run_settings

    teacher, data = tmp_path / "teacher", tmp_path / "data"
    teacher.mkdir()
    data.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "model.safetensors").write_bytes(b"weights")
    (data / "cocotalk.json").write_text("{}")
    (data / "feats.h5").write_bytes(b"features")

    def settings():
        return run_settings(teacher, data, data / "cocotalk.json", data / "feats.h5", beam_size=2)

    before = settings()
    (teacher / "notes.txt").write_text("trained on Tuesday")
    assert settings() == before
    (teacher / "model.safetensors").write_bytes(b"Weights")
    assert settings()["teacher"] != before["teacher"]
    (teacher / "model.safetensors").write_bytes(b"weights")
    (teacher / "config.json").write_text("{ }")
    assert settings()["teacher"] != before["teacher"]
    (teacher / "config.json").write_text("{}")
    assert settings() == before
    stat = (data / "feats.h5").stat()
    with open(data / "feats.h5", "r+b") as f:
        f.write(b"F")
    os.utime(data / "feats.h5", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert settings()["features_version"] != before["features_version"]


def test_a_distill_stopped_before_its_first_batch_keeps_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    from satic.training.distill import make_seqkd_labels

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    options = {"beam_size": 2, "batch_size": 3, "max_length": 8, "progress": False}
    out, partial = tmp_path / "kd.h5", tmp_path / "kd.h5.partial.npz"
    with monkeypatch.context() as patch:
        counting_decodes(patch, stop_at=0)
        with pytest.raises(KeyboardInterrupt):
            make_seqkd_labels(teacher, tiny_data, out, **options)
    assert not partial.exists() and "kept the captions" not in capsys.readouterr().err
    make_seqkd_labels(teacher, tiny_data, out, **options)
    assert out.exists() and not partial.exists()


def test_a_teacher_of_grid_features_distils_from_the_datas_grid_store_by_default(tiny_data, tmp_path):
    """Without --features, distill reads the store of the teacher's kind, as `satic eval` does: a teacher trained
    on extracted grid features (satic demo --images, or your own images) reads DATA/grid_att, not the
    built-in DATA/feats_att of other features."""
    import json
    import shutil

    from satic.data.labels import read_cocotalk
    from satic.data.stores import create_store, open_store
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import FeatureSpec, save_checkpoint
    from satic.training.distill import make_seqkd_labels
    from training_helpers import TINY_MODEL

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, symlinks=True)
    rng = np.random.default_rng(0)
    with open_store(data / "feats_att") as store, create_store(data / "grid_att", "npz") as writer:
        for image_id in store.ids():
            writer.add(image_id, rng.standard_normal((4, 20)).astype(np.float32))
    extractor = {"backbone": "efficientnet-lite0", "size": 64, "weights": None}
    (data / "grid_att.extractor.json").write_text(json.dumps(extractor))
    vocab, _ = read_cocotalk(data / "cocotalk.json")
    model = SATModel(ModelConfig(vocab_size=len(vocab), att_feat_size=20, **TINY_MODEL))
    teacher = save_checkpoint(tmp_path / "teacher", model, vocab, FeatureSpec("grid", extractor=extractor))
    report = make_seqkd_labels(teacher, data, tmp_path / "kd.h5", beam_size=2, max_length=4, progress=False)
    assert report.images == len(CaptionData.from_dir(data, data / "grid_att").split_indices("train"))


def test_distill_on_a_full_disk_says_so_and_keeps_the_earlier_labels(tiny_data, tmp_path):
    """The label file's write refused part way (a full disk, here the file size limit): one line naming it, the
    labels it was to replace kept, no temporary left; HDF5 itself must never meet the refusal (its handles then
    crash the process). With room again the same command writes them."""
    from processes import failed_on_a_full_disk, satic_with_file_size_limit

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    out = tmp_path / "kd.h5"
    out.write_bytes(b"the earlier labels")
    args = ["distill", "--teacher", str(teacher), "--data", str(tiny_data), "--out", str(out), "--beam-size", "2",
            "--max-length", "8", "--overwrite"]
    done = satic_with_file_size_limit(args, 4096)
    assert failed_on_a_full_disk(done, "distill", out), done.stderr[-3000:]
    assert out.read_bytes() == b"the earlier labels"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd.h5", "teacher"]
    assert satic_main(args) == 0
    assert read_label_h5(out).num_images == read_label_h5(tiny_data / "cocotalk_label.h5").num_images


def test_the_librarys_defaults_are_the_commands_and_the_references(tiny_data, tmp_path, monkeypatch):
    """make_seqkd_labels without options decodes as `satic distill` without them: beam 5, every one of its 5
    captions kept (the reference's labels), 50 images at a time, with a progress bar."""
    from satic.training import distill

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    calls = []

    def recorded(model, data, beam_size, batch_size, max_length, n_best, device, progress, *args, **kwargs):
        calls.append((beam_size, batch_size, n_best, progress))
        return {index: [np.array([3, 4])] for index in data.split_indices("train")}

    monkeypatch.setattr(distill, "teacher_captions", recorded)
    assert main(["--teacher", str(teacher), "--data", str(tiny_data), "--out", str(tmp_path / "cli.h5")]) == 0
    distill.make_seqkd_labels(teacher, tiny_data, tmp_path / "library.h5")
    assert calls == [(5, 50, 5, True)] * 2


def test_teacher_captions_without_a_save_function_keep_nothing_and_stop_when_told(tiny_data, tmp_path, monkeypatch):
    from satic.training import distill

    _, model = tiny_teacher(tiny_data, tmp_path / "teacher")
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    monkeypatch.setattr(distill, "SAVE_EVERY_S", 0)
    captions = distill.teacher_captions(model.eval(), data, 2, 3, 6, 2, torch.device("cpu"), progress=False)
    assert sorted(captions) == data.split_indices("train")
    counting_decodes(monkeypatch, stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        distill.teacher_captions(model.eval(), data, 2, 3, 6, 2, torch.device("cpu"), progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "teacher"]


def test_a_running_distill_keeps_its_captions_after_each_interval_without_a_word(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    """Every SAVE_EVERY_S (here after every batch) the file of the captions so far is written again, each time
    whole (every image captioned so far, readable as a run stopped there would leave it); the run says nothing
    of it, and removes the file once the labels are written."""
    from satic.training import distill

    teacher, _ = tiny_teacher(tiny_data, tmp_path / "teacher")
    out, partial = tmp_path / "kd.h5", tmp_path / "kd.h5.partial.npz"
    real, kept = distill.save_partial, []

    def save_partial(path, settings, done, captions):
        real(path, settings, done, captions)
        images, read = distill.read_partial(path, settings, split, 10**6)
        kept.append((images, sorted(read) == sorted(done)))

    split = CaptionData.from_dir(tiny_data, tiny_data / "feats_att").split_indices("train")
    monkeypatch.setattr(distill, "SAVE_EVERY_S", 0)
    monkeypatch.setattr(distill, "save_partial", save_partial)
    distill.make_seqkd_labels(teacher, tiny_data, out, beam_size=2, batch_size=3, max_length=6, progress=False)
    total = len(CaptionData.from_dir(tiny_data, tiny_data / "feats_att").split_indices("train"))
    assert kept == [(min(n, total), True) for n in range(3, total + 3, 3)]
    assert "kept the captions" not in capsys.readouterr().err
    assert out.exists() and not partial.exists()


def test_kept_captions_of_a_single_image_are_read_back(tmp_path):
    """A run of batch size 1 stopped after its first image."""
    from satic.training.distill import read_partial

    settings = {**PARTIAL_SETTINGS, "batch_size": 1, "n_best": 1}
    path = partial_file(tmp_path / "kd.h5.partial.npz", settings, images=1, index=(7,), length=(2,), words=(4, 5))
    images, read = read_partial(path, settings, PARTIAL_SPLIT, PARTIAL_VOCAB)
    assert images == 1 and [c.tolist() for c in read[7]] == [[4, 5]]


def test_a_one_word_teacher_caption_is_a_label_row():
    from satic.data.labels import LabelData
    from satic.training.distill import seqkd_label_data

    human = LabelData(np.array([[1, 2, 0], [3, 0, 0]], np.uint32), np.array([1, 2], np.uint32),
                      np.array([1, 2], np.uint32), np.array([2, 1], np.uint32))
    labels, kept_human = seqkd_label_data(human, {0: [np.array([9]), np.array([], np.int64)]})
    assert kept_human == 0
    np.testing.assert_array_equal(labels.labels, [[9, 0, 0], [3, 0, 0]])
    np.testing.assert_array_equal(labels.label_length, [1, 1])


@pytest.mark.parametrize("defaults, message", [
    ({"length_penalty": None}, "length_penalty: expected a string, got None"),
    ({"max_length": "long"}, "max_length: expected an integer, got 'long'"),
    ({"remove_bad_endings": "yes"}, "remove_bad_endings: expected true or false, got 'yes'"),
])
def test_unusable_decoding_defaults_of_the_teacher_are_refused_as_captioning_refuses_them(tiny_data, tmp_path,
                                                                                          capsys, defaults, message):
    """A hand-edited extra.decode in the teacher's config.json: one line naming the teacher and the value, the
    message `satic caption` gives, before any decoding (a null length_penalty was read as none)."""
    from satic.captioner import Captioner
    from satic.model.checkpoint import save_checkpoint

    _, model = tiny_teacher(tiny_data, tmp_path / "plain")
    teacher = save_checkpoint(tmp_path / "teacher", model, load_checkpoint(tmp_path / "plain").vocab,
                              extra={"decode": {"max_length": 8, **defaults}})
    assert satic_main(["distill", "--teacher", str(teacher), "--data", str(tiny_data),
                       "--out", str(tmp_path / "kd.h5")]) == 2
    said = capsys.readouterr().err
    assert said == (f"satic distill: error: {teacher}: the decoding defaults in its config.json (extra.decode) are "
                    f"unusable: decode options.{message}; fix or remove them, or re-save the checkpoint\n")
    with pytest.raises(SaticError) as refused:
        Captioner.load(teacher)
    assert str(refused.value) == said.removeprefix("satic distill: error: ").rstrip("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "teacher"]
