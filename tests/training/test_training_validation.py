"""Validation picks best/ as the reference does: the toolkit's CIDEr against the raw reference captions."""
import dataclasses
import json
import re
import shutil

import pytest

from satic.captioner import Captioner
from satic.data.dataset import CaptionData
from satic.decoding.options import without_bad_endings
from satic.errors import SaticError
from satic.evaluation.metrics import coco_metrics
from satic.evaluation.results import read_references
from satic.training.state import load_state
from satic.training.trainer import train
from training_helpers import make_config

VALIDATION = {"eval.max_images": 5, "eval.max_length": 8, "eval.batch_size": 2, "max_iters": 30, "save_every": 30,
              "optim.noam_warmup": 10}


def test_best_is_picked_by_cider_against_the_raw_references(tiny_data, tmp_path, without_java):
    result = train(make_config(tiny_data, tmp_path / "run", **VALIDATION))
    assert result.best_metric == "CIDEr"
    record = load_state(result.last)["progress"]["history"][-1]
    assert result.best_score == record["CIDEr"] and "CIDEr-D" in record

    # the same captions scored on their own: the first 5 val images in file order, the raw captions
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    indices = data.split_indices("val")[:5]
    ids = [data.images[i]["id"] for i in indices]
    captions = Captioner.load(result.last).caption([data.regions(i) for i in indices], max_length=8)
    raw = read_references(tiny_data / "dataset.json", "val")
    overall, _ = coco_metrics({i: raw[i] for i in ids}, {i: [c] for i, c in zip(ids, captions)})
    assert record["CIDEr"] == pytest.approx(overall["CIDEr"], rel=1e-12)
    assert record["CIDEr"] != pytest.approx(record["CIDEr-D"])


def test_without_raw_references_cider_d_of_the_labels_picks_best_and_says_so(tiny_data, tmp_path, capsys):
    bare = tmp_path / "data"
    shutil.copytree(tiny_data, bare, ignore=shutil.ignore_patterns("references.json", "dataset.json"))
    result = train(make_config(bare, tmp_path / "run", **VALIDATION))
    assert result.best_metric == "CIDEr-D"
    assert "no raw reference captions for validation" in capsys.readouterr().out
    record = load_state(result.last)["progress"]["history"][-1]
    assert result.best_score == record["CIDEr-D"] and "CIDEr" not in record

    # a stage that continues it with raw references starts its best/ afresh, by the other metric
    continued = train(make_config(tiny_data, tmp_path / "next", init_from=str(result.last), init_continue=True,
                                  **{**VALIDATION, "max_iters": 32, "save_every": 2}))
    printed = capsys.readouterr().out
    assert f"the best score carried over, {result.best_score:.4f}, is CIDEr-D; this run picks best/ by CIDEr" in printed
    assert continued.best_metric == "CIDEr"
    assert continued.best_score == load_state(continued.last)["progress"]["history"][-1]["CIDEr"]


def test_reference_files_that_do_not_fit_are_refused(tiny_data, tmp_path):
    with pytest.raises(SaticError, match="eval.references: reference file not found: .*missing.json"):
        train(make_config(tiny_data, tmp_path / "a", **{"eval.references": str(tmp_path / "missing.json")}))
    with pytest.raises(SaticError, match=r"references.json has no references for \d+ of the images .*eval.references"):
        train(make_config(tiny_data, tmp_path / "b", **{"eval.references": str(tiny_data / "references.json"),
                                                        "eval.split": "train"}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written, nor left made


@pytest.mark.parametrize("overrides, message", [
    ({"model.group_size": 4, "eval.max_length": 3},
     "eval.max_length=3 is shorter than one group of K=4 words, so validation could decode no word; set "
     "eval.max_length to at least 4"),
    ({"eval.max_length": 65}, "eval.max_length=65 is longer than the model's position table allows (K=1, "
                              "model.max_positions=64: at most 64 words); set eval.max_length to at most 64"),
    ({"scst.after_epoch": 3, "scst.max_length": 70}, "scst.max_length=70 is longer than the model's position table"),
    ({"eval.beam_size": 51}, "eval.beam_size=51 is more beams than the model has outputs (50: "),
])
def test_decoding_options_the_model_cannot_run_are_refused_before_the_first_step(tiny_data, tmp_path, overrides,
                                                                                 message):
    """The decoder would refuse them only at the first validation (save_every iterations in) or the first
    self-critical step, without naming the option."""
    with pytest.raises(SaticError, match=re.escape(message)):
        train(make_config(tiny_data, tmp_path / "run", max_iters=1, save_at_end=False, **overrides))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, positions", [({"group_size": 1, "max_positions": 16}, 17),
                                             ({"group_size": 4, "max_positions": 18}, 19)])
def test_labels_longer_than_the_position_table_are_refused_before_the_first_step(tiny_data, tmp_path, model,
                                                                                  positions):
    """The first training pass would refuse them, naming no option, after the run folder was made."""
    overrides = {f"model.{key}": value for key, value in model.items()}
    with pytest.raises(SaticError, match=re.escape(
            f"cocotalk_label.h5 have up to 16 words, which a K={model['group_size']} model reads at {positions} "
            f"positions, more than model.max_positions={model['max_positions']}; set model.max_positions to at "
            f"least {positions}")):
        train(make_config(tiny_data, tmp_path / "run", max_iters=1, **overrides))
    assert not (tmp_path / "run").exists()
    overrides["model.max_positions"] = positions  # the least that fits
    assert train(make_config(tiny_data, tmp_path / "run", max_iters=1, **overrides)).iterations == 1


def test_a_kd_teacher_too_short_for_the_labels_is_refused_before_the_first_step(tiny_data, tmp_path):
    """The teacher reads the same label captions at its own K: its position table must hold them too."""
    from satic.model import ModelConfig, SATModel
    from satic.model.checkpoint import load_checkpoint, save_checkpoint
    from training_helpers import TINY_MODEL

    train(make_config(tiny_data, tmp_path / "teacher", max_iters=0))
    trained = load_checkpoint(tmp_path / "teacher" / "last")
    short = SATModel(ModelConfig(vocab_size=len(trained.vocab), att_feat_size=trained.config.att_feat_size,
                                 **{**TINY_MODEL, "max_positions": 16}))
    save_checkpoint(tmp_path / "short", short, trained.vocab, trained.features)
    kd = {"kd.teacher": str(tmp_path / "short"), "kd.weight": 0.5}
    with pytest.raises(SaticError, match=re.escape(
            f"the captions of {tiny_data / 'cocotalk_label.h5'} have up to 16 words, which a K=1 model reads at 17 "
            f"positions, more than the 16 of kd.teacher={tmp_path / 'short'}; use a teacher of at least 17 "
            "positions, or prepare shorter labels")):
        train(make_config(tiny_data, tmp_path / "run", max_iters=1, **kd))
    assert not (tmp_path / "run").exists()
    kd["kd.teacher"] = str(tmp_path / "teacher" / "last")
    assert train(make_config(tiny_data, tmp_path / "run", max_iters=1, **kd)).iterations == 1


def test_a_split_without_images_is_named_as_the_eval_split(tiny_data, tmp_path):
    """A dataset of one's own with every image in train: the option to change, not only the data's state."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    info = json.loads((data_dir / "cocotalk.json").read_text())
    for image in info["images"]:
        image["split"] = "train" if image["split"] == "val" else image["split"]
    (data_dir / "cocotalk.json").write_text(json.dumps(info))
    with pytest.raises(SaticError, match=r"^eval.split=val: .*cocotalk.json has no images in split 'val'; validate on "
                                         r"another split \(eval.split\), or give some images that split"):
        train(make_config(data_dir, tmp_path / "run", max_iters=1))
    assert not (tmp_path / "run").exists()


def test_the_data_folder_file_that_has_the_images_is_used(tiny_data, tmp_path):
    """references.json (satic prepro) holds val and test only; the built-in dataset.json has the train split."""
    result = train(make_config(tiny_data, tmp_path / "run", **{**VALIDATION, "max_iters": 2, "save_every": 2,
                                                                 "eval.split": "train"}))
    assert result.best_metric == "CIDEr"


def test_validation_takes_the_references_decoding_options(tiny_data, tmp_path, without_java):
    """eval.length_penalty, block_trigrams and remove_bad_endings reach validation, as the reference's training
    command passes its --length_penalty, --block_trigrams and --remove_bad_endings to its validation; the
    checkpoints carry max_length, length_penalty and remove_bad_endings as their decoding defaults, as the
    reference's infos carry them to its eval.py (block_trigrams, which its eval.py does not take, is left out)."""
    options = {"eval.beam_size": 2, "eval.length_penalty": "avg_1", "eval.block_trigrams": True,
               "eval.remove_bad_endings": True, "eval.max_length": 6}  # 6 words: some captions end in 'a'
    options = {**VALIDATION, **options}
    result = train(make_config(tiny_data, tmp_path / "run", **options))
    record = load_state(result.last)["progress"]["history"][-1]
    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    indices = data.split_indices("val")[:5]
    ids = [data.images[i]["id"] for i in indices]
    captioner = Captioner.load(result.last)
    assert captioner.decode_defaults == {"max_length": 6, "length_penalty": "avg_1", "remove_bad_endings": True}
    regions = [data.regions(i) for i in indices]
    trimmed = captioner.caption(regions, beam_size=2, block_trigrams=True)  # the checkpoint's defaults
    captions = captioner.caption(regions, beam_size=2, block_trigrams=True, remove_bad_endings=False)
    assert trimmed == [without_bad_endings(c) for c in captions] != captions
    raw = read_references(tiny_data / "dataset.json", "val")
    overall, _ = coco_metrics({i: raw[i] for i in ids}, {i: [c] for i, c in zip(ids, trimmed)})
    assert record["CIDEr"] == pytest.approx(overall["CIDEr"], rel=1e-12)
    with pytest.raises(SaticError, match="eval.length_penalty must be"):
        train(make_config(tiny_data, tmp_path / "bad", **{"eval.length_penalty": "wu"}))


def test_validation_reports_the_references_loss(tiny_data, tmp_path):
    """The reference's eval_split loss: its criterion on each validated image's label captions, dropout off,
    averaged over batches of the training batch size (a batch's mean per word, then the mean of those),
    whatever batch size validation decodes in; with label smoothing, the smoothed criterion."""
    import dataclasses

    import numpy as np
    import torch

    from satic.model import ModelConfig, SATModel
    from satic.training.data import open_training_data
    from satic.training.losses import cross_entropy
    from satic.training.validation import validate
    from training_helpers import TINY_MODEL

    config = make_config(tiny_data, tmp_path / "run")
    data = open_training_data(config.data, seed=1)
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=len(data.vocab), att_feat_size=data.feature_dim,
                                 **{**TINY_MODEL, "group_size": 2, "dropout": 0.3}))
    indices = data.captions.split_indices("val")
    assert len(indices) == 4
    by_hand = {}
    for smoothing in (0.0, 0.1):
        batch_losses = []
        for start in range(0, 4, 3):  # batches of 3 and 1 images
            chunk = indices[start:start + 3]
            assert all(len(data.captions.labels.captions(i)) == 5 for i in chunk)  # so all 5, in order
            batch = data.captions.collate(chunk, [np.random.default_rng(9)] * len(chunk), 5)
            model.eval()
            with torch.no_grad():
                logprobs = model(batch.att_feats, batch.att_masks, batch.labels[:, :-1])
            total, count = cross_entropy(logprobs, batch.labels[:, 1:], batch.masks[:, 1:], smoothing)
            batch_losses.append(float(total / count))
        by_hand[smoothing] = sum(batch_losses) / len(batch_losses)
    model.train()
    for eval_batch in (2, 4):
        evaluation = dataclasses.replace(config.eval, max_images=4, batch_size=eval_batch)
        for smoothing in (0.0, 0.1):
            metrics = validate(model, data, evaluation, torch.device("cpu"), seq_per_img=5, smoothing=smoothing,
                               loss_batch=3)
            assert metrics["loss"] == pytest.approx(by_hand[smoothing], rel=1e-6)
    assert model.training  # validation leaves the mode as it found it
    global_mean = validate(model, data, evaluation, torch.device("cpu"), seq_per_img=5, loss_batch=4)["loss"]
    assert global_mean != pytest.approx(by_hand[0.0], rel=1e-6)  # one batch of 4: another average


def test_a_run_logs_and_prints_each_validation(tiny_data, tmp_path, without_java, capsys):
    from satic.training.monitor import read_log

    result = train(make_config(tiny_data, tmp_path / "run", **{**VALIDATION, "save_every": 10}))
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "val"]
    history = load_state(result.last)["progress"]["history"]
    assert [r["loss"] for r in records] == [h["loss"] for h in history] and history[-1]["loss"] > 0
    out = capsys.readouterr().out
    assert out.startswith("run: K=1, 1 layer, d_model 16, 2 heads, 7,490 parameters; 32 training images, 4 per batch x "
                          "2 captions; XE; 30 iterations, from scratch\nrun: validation every 10 iterations on 4 val "
                          "images; best/ by CIDEr against references.json\n")
    printed = [line for line in out.splitlines() if ": iteration " in line and ": validation " in line]
    assert len(printed) == len(history) == 3
    for i, (line, h) in enumerate(zip(printed, history)):
        assert line.startswith(f"run: iteration {h['iteration']}, epoch {h['epoch']}: "
                               f"validation CIDEr {h['CIDEr']:.4f}")
        assert line.endswith(f"CIDEr-D {h['CIDEr-D']:.4f}, loss {h['loss']:.4f}")
        assert ("(best)" in line) == all(h["CIDEr"] > earlier["CIDEr"] for earlier in history[:i])


def test_a_run_logs_every_log_every_iterations_and_where_it_stops(tiny_data, tmp_path, monkeypatch):
    """The speed logged is the step's images over the step's time (a clock that gains half a second a call)."""
    from types import SimpleNamespace

    from satic.training import trainer
    from satic.training.monitor import read_log

    ticks = iter(range(1000))
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: 100 + next(ticks) / 2))
    train(make_config(tiny_data, tmp_path / "run", max_iters=5, log_every=2))
    records = read_log(tmp_path / "run" / "log.jsonl")
    assert [(r["kind"], r["iteration"]) for r in records] == [("train", 2), ("train", 4), ("train", 5), ("val", 5)]
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["epoch"] == 0 for r in records if r["kind"] == "train")
    assert [r["images_per_s"] for r in records if r["kind"] == "train"] == [8.0, 8.0, 8.0]  # 4 images in 0.5 s
    assert not any("reward" in r for r in records)  # XE steps draw no samples
    train(make_config(tiny_data, tmp_path / "scst", max_iters=1, **{"scst.after_epoch": 0}))
    (record,) = [r for r in read_log(tmp_path / "scst" / "log.jsonl") if r["kind"] == "train"]
    assert isinstance(record["reward"], float)  # a self-critical step logs its samples' mean reward


def test_the_summary_names_the_objective_the_length_and_the_start(tiny_data, tmp_path):
    """The run's two opening lines: token KD and self-critical training in the objective, a max_epochs limit in
    iterations (8 per epoch: 32 training images in batches of 4), and what the run starts from."""
    from satic.training.trainer import Trainer

    start = train(make_config(tiny_data, tmp_path / "start", max_iters=2)).last
    summaries = {}
    for name, settings in {
        "kd": {"max_iters": -1, "max_epochs": 3, "init_from": str(start), "kd.teacher": str(start), "kd.weight": 0.5,
               "scst.after_epoch": 2},
        "scst": {"max_iters": 20, "max_epochs": 1, "resume": str(start), "scst.after_epoch": 0},
        "big": {"model.d_model": 128, "model.d_ff": 256, "save_every": 1},
    }.items():
        trainer = Trainer(make_config(tiny_data, tmp_path / name, **settings))
        summaries[name] = trainer.summary().splitlines()[0]
    lengths = []  # the length alone: a limit of 0 iterations or 0 epochs is the lower of the two
    for max_iters, max_epochs in ((0, -1), (5, 0), (-1, 2)):
        trainer.config = dataclasses.replace(trainer.config, max_iters=max_iters, max_epochs=max_epochs)
        lengths.append(trainer.summary().splitlines()[0].split("; ")[-1])
    trainer.config = dataclasses.replace(trainer.config, optim=dataclasses.replace(trainer.config.optim, accum_steps=2))
    lengths.append(trainer.summary().splitlines()[0].split("; ")[-1])  # 2 batches of 4 per iteration
    assert lengths == ["0 iterations, from scratch", "0 iterations, from scratch", "16 iterations, from scratch",
                       "8 iterations, from scratch"]
    trainer.config = dataclasses.replace(trainer.config, scst=dataclasses.replace(trainer.config.scst, after_epoch=1))
    assert "; XE, self-critical from epoch 1; 8 iterations, from scratch\n" in trainer.summary()
    assert summaries["kd"].endswith(f"; XE + 0.5 x token KD, self-critical from epoch 2; 24 iterations, from {start}")
    assert summaries["scst"].endswith("; self-critical; 8 iterations, resuming at iteration 2")
    assert re.search(r"^big: K=1, 1 layer, d_model 128, 2 heads, \d\.\d M parameters; .*; XE; 2 iterations, from "
                     r"scratch$", summaries["big"]), summaries["big"]


def test_a_run_prints_its_summary_and_validations_and_keeps_its_settings_and_curves(tiny_data, tmp_path, capsys):
    """A fresh run's standard output: the two summary lines (model, data, objective, length, start; validation
    and what picks best/), then its validation lines and nothing else. Its settings, as the run took them, are in
    config.json, and curves.png holds its log when it ends."""
    from satic.config import to_dict

    config = make_config(tiny_data, tmp_path / "run", max_iters=2)
    train(config)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [
        "run: K=1, 1 layer, d_model 16, 2 heads, 7,490 parameters; 32 training images, 4 per batch x 2 captions; "
        "XE; 2 iterations, from scratch",
        "run: validation every 100 iterations on 3 val images; best/ by CIDEr against references.json"]
    assert len(printed) == 3 and re.fullmatch(
        r"run: iteration 2, epoch 0: validation CIDEr \d\.\d{4} \(best\), CIDEr-D \d\.\d{4}, loss \d\.\d{4}",
        printed[2]), printed
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == to_dict(config)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_validation_that_only_equals_the_best_score_leaves_best_where_it_is(tiny_data, tmp_path):
    """best/ moves only to a higher score: with a learning rate of 0 every validation scores the same, and best/
    stays the first validation's checkpoint."""
    result = train(make_config(tiny_data, tmp_path / "run", max_iters=4, save_every=2,
                               **{"optim.schedule": "constant", "optim.lr": 0.0}))
    history = load_state(result.last)["progress"]["history"]
    assert [h["iteration"] for h in history] == [2, 4] and history[0]["CIDEr"] == history[1]["CIDEr"]
    assert load_state(result.best)["progress"]["iteration"] == 2


def test_validation_ids_are_the_first_max_images_of_the_split(tiny_data):
    from satic.training.config import EvalConfig
    from satic.training.validation import validation_image_ids

    data = CaptionData.from_dir(tiny_data, tiny_data / "feats_att")
    val = [data.images[i]["id"] for i in data.split_indices("val")]
    assert len(val) > 2
    assert validation_image_ids(data, EvalConfig(max_images=1)) == val[:1]
    assert validation_image_ids(data, EvalConfig(max_images=2)) == val[:2]
    assert validation_image_ids(data, EvalConfig(max_images=-1)) == val


def test_validation_cider_d_is_the_mean_over_the_images(tiny_data, tmp_path):
    import dataclasses

    import numpy as np
    import torch

    from satic.model import ModelConfig, SATModel
    from satic.training.data import open_training_data
    from satic.training.validation import caption_split, validate
    from training_helpers import TINY_MODEL

    config = make_config(tiny_data, tmp_path / "run")
    data = open_training_data(config.data, seed=1)
    torch.manual_seed(3)
    model = SATModel(ModelConfig(vocab_size=len(data.vocab), att_feat_size=data.feature_dim, **TINY_MODEL))
    evaluation = dataclasses.replace(config.eval, max_images=4, batch_size=2)
    metrics = validate(model, data, evaluation, torch.device("cpu"))
    done = caption_split(model, data, evaluation, torch.device("cpu"))
    width = max(len(s) for s in done.seqs)
    per_image = [float(data.cider(np.pad(s, (0, width - len(s)))[None], [refs])[0])
                 for s, refs in zip(done.seqs, done.refs)]
    assert len(set(per_image)) > 1  # a median or a single image's score would differ from the mean
    assert metrics["CIDEr-D"] == pytest.approx(sum(per_image) / len(per_image), rel=1e-9)


@pytest.mark.parametrize("batch_size, processes, sizes", [(1, 3, [2, 1, 1]), (1, 5, [1, 1, 1, 1, 0]),
                                                         (3, 2, [3, 1]), (3, 3, [3, 1, 0])])
def test_the_shares_of_the_split_joined_are_the_whole_pass(tiny_data, tmp_path, batch_size, processes, sizes):
    """Under torchrun each rank decodes a run of whole validation batches: joined in rank order, the shares are
    the one-process pass, captions and per-image losses bit for bit (a rank past the last batch gets none)."""
    import dataclasses

    import numpy as np
    import torch

    from satic.model import ModelConfig, SATModel
    from satic.training.data import open_training_data
    from satic.training.distributed import World
    from satic.training.validation import SplitPass, caption_split
    from training_helpers import TINY_MODEL

    config = make_config(tiny_data, tmp_path / "run")
    data = open_training_data(config.data, seed=1)
    torch.manual_seed(3)
    model = SATModel(ModelConfig(vocab_size=len(data.vocab), att_feat_size=data.feature_dim, **TINY_MODEL))
    evaluation = dataclasses.replace(config.eval, max_images=-1, batch_size=batch_size)  # the 4 val images
    whole = caption_split(model, data, evaluation, torch.device("cpu"))
    shares = [caption_split(model, data, evaluation, torch.device("cpu"), world=World(rank, processes))
              for rank in range(processes)]
    assert [len(share.ids) for share in shares] == sizes
    joined = SplitPass.join(shares)
    assert joined.ids == whole.ids and len(whole.ids) == 4
    for a, b in zip(joined.seqs, whole.seqs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(joined.sums, whole.sums)
    np.testing.assert_array_equal(joined.counts, whole.counts)
    assert joined.loss(3) == whole.loss(3)


def test_the_loss_is_the_mean_of_each_batchs_per_word_loss():
    """SplitPass.loss: the images in file order cut into batches (the last one shorter), each batch's summed loss
    over its word count, then the plain mean of those; batches of 10 images unless told (the reference's size)."""
    import numpy as np

    from satic.training.validation import SplitPass

    sums = np.array([1.0] * 10 + [3.0, 5.0])
    counts = np.array([2.0] * 10 + [1.0, 3.0])
    done = SplitPass(list(range(12)), [], [], sums, counts)
    assert done.loss() == done.loss(10) == pytest.approx((10 / 20 + 8 / 4) / 2, rel=1e-15)
    assert done.loss(11) == pytest.approx((13 / 21 + 5 / 3) / 2, rel=1e-15)
    assert done.loss(12) == pytest.approx(18 / 24, rel=1e-15)


def test_validation_defaults_are_the_references_five_captions_and_batches_of_ten(tiny_data, tmp_path):
    """Called without them, validate and caption_split score 5 label captions of each image, and validate
    averages the loss over batches of 10 images (the reference's seq_per_img and batch_size)."""
    import dataclasses

    import numpy as np
    import torch

    from satic.model import ModelConfig, SATModel
    from satic.training.data import open_training_data
    from satic.training.validation import caption_split, validate
    from training_helpers import TINY_MODEL

    config = make_config(tiny_data, tmp_path / "run")
    data = open_training_data(config.data, seed=1)
    torch.manual_seed(3)
    model = SATModel(ModelConfig(vocab_size=len(data.vocab), att_feat_size=data.feature_dim, **TINY_MODEL))
    evaluation = dataclasses.replace(config.eval, split="train", max_images=12, batch_size=6)
    done = caption_split(model, data, evaluation, torch.device("cpu"))
    five = caption_split(model, data, evaluation, torch.device("cpu"), seq_per_img=5)
    assert len(done.ids) == 12
    np.testing.assert_array_equal(done.counts, five.counts)
    np.testing.assert_array_equal(done.sums, five.sums)
    assert five.loss(10) != pytest.approx(five.loss(11), rel=1e-9)  # batches of 10 are told apart
    assert validate(model, data, evaluation, torch.device("cpu"))["loss"] == pytest.approx(five.loss(10), rel=1e-12)


def test_all_metrics_score_against_the_raw_references_when_there_are_some(tiny_data, tmp_path, without_java):
    """eval.all_metrics: the toolkit's metrics against the raw references (with their CIDEr as 'CIDEr'), else
    against the label file's captions; CIDEr-D of the labels and the loss either way."""
    import dataclasses

    import torch

    from satic.model import ModelConfig, SATModel
    from satic.training.data import open_training_data
    from satic.training.validation import caption_split, load_validation_references, validate
    from training_helpers import TINY_MODEL

    config = make_config(tiny_data, tmp_path / "run")
    data = open_training_data(config.data, seed=1)
    torch.manual_seed(3)
    model = SATModel(ModelConfig(vocab_size=len(data.vocab), att_feat_size=data.feature_dim, **TINY_MODEL))
    evaluation = dataclasses.replace(config.eval, max_images=4, batch_size=2, all_metrics=True)
    references = load_validation_references(data.captions, evaluation, tiny_data)
    plain = validate(model, data, dataclasses.replace(evaluation, all_metrics=False), torch.device("cpu"),
                     references)
    raw = validate(model, data, evaluation, torch.device("cpu"), references)
    labels = validate(model, data, evaluation, torch.device("cpu"))
    assert raw["CIDEr"] == pytest.approx(plain["CIDEr"], rel=1e-12)
    assert raw["loss"] == labels["loss"] == plain["loss"] and raw["CIDEr-D"] == labels["CIDEr-D"]
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(raw) and set(raw) == set(labels)
    assert raw["Bleu_1"] != pytest.approx(labels["Bleu_1"], rel=1e-6)  # other references, other scores
    done = caption_split(model, data, evaluation, torch.device("cpu"))
    res = {i: [data.vocab.decode(s)] for i, s in zip(done.ids, done.seqs)}
    assert list(references.raw) == done.ids
    overall, _ = coco_metrics(references.raw, res)
    assert {k: raw[k] for k in overall} == pytest.approx(overall, rel=1e-12)
    overall, _ = coco_metrics({i: [data.vocab.decode(r) for r in refs] for i, refs in zip(done.ids, done.refs)}, res)
    assert {k: labels[k] for k in overall} == pytest.approx(overall, rel=1e-12)


def test_the_loss_counts_the_end_token_of_a_caption_of_the_full_length(tiny_data, tmp_path):
    """Teacher forcing reads every label position but the last: a caption cut at the label file's length still
    has its end token scored, one word more than its length (the label rows are cut to 3 words here)."""
    import dataclasses

    import numpy as np
    import torch

    from satic.data.labels import LabelData, read_label_h5, write_label_h5
    from satic.model import ModelConfig, SATModel
    from satic.training.data import open_training_data
    from satic.training.validation import caption_split
    from training_helpers import TINY_MODEL

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    full = read_label_h5(data_dir / "cocotalk_label.h5")
    assert full.label_length.min() > 3
    write_label_h5(data_dir / "cocotalk_label.h5", LabelData(np.ascontiguousarray(full.labels[:, :3]),
                                                             full.label_start_ix, full.label_end_ix,
                                                             np.minimum(full.label_length, 3)))
    config = make_config(data_dir, tmp_path / "run")
    data = open_training_data(config.data, seed=1)
    torch.manual_seed(3)
    model = SATModel(ModelConfig(vocab_size=len(data.vocab), att_feat_size=data.feature_dim, **TINY_MODEL))
    evaluation = dataclasses.replace(config.eval, max_images=4, batch_size=2)
    done = caption_split(model, data, evaluation, torch.device("cpu"), seq_per_img=2)
    np.testing.assert_array_equal(done.counts, [2 * (3 + 1)] * 4)


def test_decoding_options_at_their_limits_are_accepted(tmp_path):
    """One group of K words, the whole position table and a beam per output are the largest settings the model
    runs; one word, one group or one beam past them is refused. scst.max_length is checked only where
    self-critical training runs."""
    from satic.model import ModelConfig
    from satic.training.trainer import check_decoding_fits

    model = ModelConfig(vocab_size=9, group_size=2, max_positions=11)  # 10 outputs; groups of 2 up to 10 words

    def check(**overrides):
        check_decoding_fits(make_config(tmp_path, tmp_path / "run", **overrides), model)

    for length in (2, 10):
        check(**{"eval.max_length": length, "scst.after_epoch": 0, "scst.max_length": length, "eval.beam_size": 10})
    for option, length, problem in (("eval", 1, "shorter than one group"), ("eval", 11, "longer than"),
                                    ("scst", 1, "shorter than one group"), ("scst", 11, "longer than")):
        with pytest.raises(SaticError, match=rf"^{option}.max_length={length} is {problem}"):
            check(**{f"{option}.max_length": length, "scst.after_epoch": 0})
    check(**{"scst.max_length": 1, "scst.after_epoch": -1})
    with pytest.raises(SaticError, match=r"^eval.beam_size=11 is more beams than the model has outputs \(10: "):
        check(**{"eval.beam_size": 11})


def test_a_validation_line_shows_the_selected_metric_first_then_the_others_and_the_loss():
    """The metric that picks best/ comes first, marked when it is the best so far; then CIDEr, CIDEr-D, Bleu_4,
    METEOR, ROUGE_L and SPICE as far as the validation has them (not Bleu_1..3), then the loss."""
    from satic.training.trainer import validation_line

    metrics = {"Bleu_1": 0.9, "Bleu_2": 0.8, "Bleu_3": 0.7, "Bleu_4": 0.6, "METEOR": 0.25, "ROUGE_L": 0.5,
               "CIDEr": 1.25, "SPICE": 0.2, "CIDEr-D": 1.125, "loss": 2.5}
    assert validation_line("run", 30, 2, metrics, "CIDEr", True) == (
        "run: iteration 30, epoch 2: validation CIDEr 1.2500 (best), CIDEr-D 1.1250, Bleu_4 0.6000, METEOR 0.2500, "
        "ROUGE_L 0.5000, SPICE 0.2000, loss 2.5000")
    assert validation_line("run", 40, 3, {"CIDEr": 0.75, "CIDEr-D": 0.5, "loss": 3.0}, "CIDEr-D", False) == (
        "run: iteration 40, epoch 3: validation CIDEr-D 0.5000, CIDEr 0.7500, loss 3.0000")


def test_the_progress_bar_shows_only_with_progress_on(tiny_data, tmp_path, capsys):
    """progress=true: the run's bar on stderr, its iterations counted and the step's loss and rate beside them;
    progress=false: nothing there."""
    train(make_config(tiny_data, tmp_path / "quiet", max_iters=2, progress=False))
    assert capsys.readouterr().err == ""
    train(make_config(tiny_data, tmp_path / "shown", max_iters=2, progress=True))
    bar = capsys.readouterr().err.splitlines()
    last = r"^shown: 100% 2/2 .*, loss=\d\.\d{3}, lr=\d\.\d{2}e-\d\d, img/s=\d+\.\d\]$"
    assert bar[0].startswith("shown:   0% 0/2") and re.match(last, bar[-1]), bar
