"""One XE step and one SCST step of `satic train` equal the same step computed by hand."""
import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from satic.data.dataset import CaptionData, CaptionLoader
from satic.decoding import DecodeOptions, decode, sequence_logprobs
from satic.evaluation.cider import CiderD
from satic.evaluation.document_frequency import DocumentFrequency
from satic.errors import SaticError
from satic.model.checkpoint import FeatureSpec, load_checkpoint, save_checkpoint
from satic.model.transformer import SATModel
from satic.training.losses import cross_entropy, self_critical, token_kl
from satic.training.schedule import noam_rate
from satic.training.scst import advantages
from satic.training.trainer import train, xe_loss
from training_helpers import make_config, weights


def _first_batch(data_dir, seed=1, batch_size=4):
    data = CaptionData.from_dir(data_dir, data_dir / "feats_att")
    return next(iter(CaptionLoader(data, "train", batch_size=batch_size, seq_per_img=2, seed=seed)))


def _first_batches(data_dir, count, batch_size):
    loader = iter(CaptionLoader(CaptionData.from_dir(data_dir, data_dir / "feats_att"), "train",
                                batch_size=batch_size, seq_per_img=2, seed=1))
    return [next(loader) for _ in range(count)]


def _manual_update(model, loss, lr, eps=1e-9, clip="value"):
    """The trainer's update: clip each gradient element to 0.1 (clip="norm": the gradients' norm, None: no
    clip), one fresh Adam(0.9, 0.98, eps) step."""
    model.zero_grad()
    loss.backward()
    if clip == "value":
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
    elif clip == "norm":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=eps).step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _train_record(out_dir):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "train" and r["iteration"] == 1)


@pytest.fixture(scope="module")
def initial(tiny_data, tmp_path_factory):
    """A run stopped before its first step: its checkpoint holds the initial weights."""
    out = tmp_path_factory.mktemp("init")
    result = train(make_config(tiny_data, out, max_iters=0))
    assert result.iterations == 0
    return out / "last"


def test_one_xe_step(tiny_data, initial, tmp_path):
    result = train(make_config(tiny_data, tmp_path, max_iters=1))
    assert result.iterations == 1
    model = load_checkpoint(initial).model.train()
    batch = _first_batch(tiny_data)
    logprobs = model(batch.att_feats, batch.att_masks, batch.labels[:, :-1])
    total, count = cross_entropy(logprobs, batch.labels[:, 1:], batch.masks[:, 1:])
    loss = total / count
    assert _train_record(tmp_path)["loss"] == pytest.approx(loss.item(), rel=1e-5)
    expected = _manual_update(model, loss, noam_rate(1, 16, 1.0, 4))
    got = weights(tmp_path / "last")
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "best" / "train_state.pt").is_file()


@pytest.mark.parametrize("clip, settings", [("norm", {"optim.grad_clip_mode": "norm"}),
                                            (None, {"optim.grad_clip": 0.0})])
def test_grad_clip_norm_and_off_as_the_update_by_hand(tiny_data, initial, tmp_path, clip, settings):
    """optim.grad_clip_mode=norm rescales all gradients together to norm optim.grad_clip before the Adam step;
    optim.grad_clip=0 leaves them as they are. eps 1e-2 makes Adam's first step depend on the gradients' size,
    so clipping each element would differ."""
    train(make_config(tiny_data, tmp_path, max_iters=1, **settings, **{"optim.eps": 1e-2}))
    model = load_checkpoint(initial).model.train()
    batch = _first_batch(tiny_data)
    logprobs = model(batch.att_feats, batch.att_masks, batch.labels[:, :-1])
    total, count = cross_entropy(logprobs, batch.labels[:, 1:], batch.masks[:, 1:])
    expected = _manual_update(model, total / count, noam_rate(1, 16, 1.0, 4), eps=1e-2, clip=clip)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm.item() == pytest.approx(0.1, rel=1e-4) if clip else norm.item() > 0.1  # the clip cut them
    for name, value in weights(tmp_path / "last").items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_step_of_one_counted_word_has_that_words_loss_and_one_of_none_has_zero(tmp_path):
    """A step's XE is the mean over its labelled words, divided by the count as it is down to a single word; a
    count of 0 gives a loss of 0."""
    logprobs = torch.log_softmax(torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(0)), -1)
    batch = SimpleNamespace(labels=torch.tensor([[0, 3, 0]]), masks=torch.tensor([[1.0, 1.0, 0.0]]),
                            att_feats=None, att_masks=None)
    config = make_config(tmp_path, tmp_path)
    loss = xe_loss(lambda feats, masks, seq: logprobs, batch, torch.tensor(1.0), config)
    assert loss.item() == pytest.approx(-logprobs[0, 0, 3].item(), rel=1e-6)
    none = SimpleNamespace(labels=torch.tensor([[0, 0, 0]]), masks=torch.zeros(1, 3), att_feats=None, att_masks=None)
    assert xe_loss(lambda feats, masks, seq: logprobs, none, torch.tensor(0.0), config).item() == 0.0


def test_token_kd_counts_the_end_token_of_a_caption_of_the_full_length(tmp_path):
    """Token KD compares student and teacher at every labelled position, the end token after a caption of the
    label file's full length included: the teacher reads the same input words as the student."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.log_softmax(torch.randn(1, 3, 6, generator=generator), -1) for _ in range(2))
    batch = SimpleNamespace(labels=torch.tensor([[0, 3, 4, 0]]), masks=torch.ones(1, 4), att_feats=None,
                            att_masks=None)
    config = make_config(tmp_path, tmp_path, **{"kd.weight": 0.5, "kd.teacher": str(tmp_path)})
    loss = xe_loss(lambda feats, masks, seq: student[:, :seq.size(1)], batch, torch.tensor(3.0), config,
                   teacher=lambda feats, masks, seq: teacher[:, :seq.size(1)])
    xe, count = cross_entropy(student, batch.labels[:, 1:], batch.masks[:, 1:])
    kl, _ = token_kl(student, teacher, batch.masks[:, 1:])
    assert count.item() == 3
    assert loss.item() == pytest.approx(((xe + 0.5 * kl) / 3).item(), rel=1e-6)


def test_one_scst_step_from_init(tiny_data, initial, tmp_path):
    """The trainer backpropagates through its sampling pass; without dropout that equals scoring the same
    draws in one parallel pass. eps 1e-4: Adam's first step is about lr * sign(gradient), so a gradient
    that is 0 up to rounding (a dead ReLU unit) would move by up to lr either way."""
    train(make_config(tiny_data, tmp_path, max_iters=1, init_from=str(initial),
                      **{"scst.after_epoch": 0, "optim.eps": 1e-4}))
    model = load_checkpoint(initial).model.train()
    batch = _first_batch(tiny_data)
    generator = torch.Generator().manual_seed(1 * 1000)
    seq = decode(model, batch.att_feats, batch.att_masks,
                 DecodeOptions(sample_method="sample", sample_n=2, max_length=8), generator).seq
    cider = CiderD(DocumentFrequency.load(tiny_data / "cider_df.json"))
    rewards = cider.score_token_ids(seq.numpy(), batch.gts)
    adv = torch.as_tensor(advantages(rewards, 2, "new"), dtype=torch.float32)
    total, count = self_critical(sequence_logprobs(model, batch.att_feats, batch.att_masks, seq), seq, adv)
    loss = total / count
    assert rewards.std() > 0 and loss.item() != 0  # the step really moves the weights
    record = _train_record(tmp_path)
    assert record["reward"] == pytest.approx(float(np.mean(rewards)), rel=1e-9)
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    expected = _manual_update(model, loss, noam_rate(1, 16, 1.0, 4), eps=1e-4)
    for name, value in weights(tmp_path / "last").items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_scst_accumulating_two_batches_takes_the_mean_of_their_means(tiny_data, initial, tmp_path):
    """Self-critical training over optim.accum_steps=2 batches: the step's loss (and gradient) is the mean of
    the two batches' per-word means, its reward the mean over all their samples; the samples are drawn batch
    after batch from the run's one sampling stream."""
    train(make_config(tiny_data, tmp_path, max_iters=1, init_from=str(initial),
                      **{"scst.after_epoch": 0, "optim.eps": 1e-4, "data.batch_size": 2, "optim.accum_steps": 2}))
    model = load_checkpoint(initial).model.train()
    generator = torch.Generator().manual_seed(1 * 1000)
    cider = CiderD(DocumentFrequency.load(tiny_data / "cider_df.json"))
    losses, rewards = [], []
    for batch in _first_batches(tiny_data, 2, batch_size=2):
        seq = decode(model, batch.att_feats, batch.att_masks,
                     DecodeOptions(sample_method="sample", sample_n=2, max_length=8), generator).seq
        reward = cider.score_token_ids(seq.numpy(), batch.gts)
        adv = torch.as_tensor(advantages(reward, 2, "new"), dtype=torch.float32)
        total, count = self_critical(sequence_logprobs(model, batch.att_feats, batch.att_masks, seq), seq, adv)
        losses.append(total / count)
        rewards.append(reward)
    loss = (losses[0] + losses[1]) / 2
    assert losses[0].item() != pytest.approx(losses[1].item(), rel=1e-2)
    record = _train_record(tmp_path)
    assert record["reward"] == pytest.approx(float(np.mean(np.concatenate(rewards))), rel=1e-9)
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    expected = _manual_update(model, loss, noam_rate(1, 16, 1.0, 4), eps=1e-4)
    for name, value in weights(tmp_path / "last").items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("schedule, betas, eps", [("noam", [0.9, 0.98], 1e-9), ("constant", [0.9, 0.999], 1e-8),
                                                    ("plateau", [0.9, 0.999], 1e-8)])
def test_adam_defaults_follow_the_schedule_as_the_reference(tiny_data, tmp_path, schedule, betas, eps):
    """The reference's NoamOpt builds Adam(0.9, 0.98, 1e-9); every other schedule its optim_alpha, optim_beta
    and optim_epsilon defaults, Adam(0.9, 0.999, 1e-8). The run's optimizer and recorded config hold them."""
    train(make_config(tiny_data, tmp_path, max_iters=1, **{"optim.schedule": schedule, "optim.lr": 1e-4}))
    recorded = json.loads((tmp_path / "config.json").read_text())["optim"]
    assert (recorded["betas"], recorded["eps"]) == (betas, eps)
    group = torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (list(group["betas"]), group["eps"]) == (betas, eps)
    explicit = make_config(tiny_data, tmp_path, **{"optim.schedule": schedule, "optim.betas": [0.8, 0.9],
                                                   "optim.eps": 1e-6})
    assert (tuple(explicit.optim.betas), explicit.optim.eps) == ((0.8, 0.9), 1e-6)


def test_the_starting_validation_is_not_seen_by_reduce_on_plateau(tiny_data, initial, tmp_path):
    """A stage started from other weights validates them first (they set the first best), but the reference's
    scheduler first steps at save_every: the plateau bookkeeping begins with the run's own validations."""
    train(make_config(tiny_data, tmp_path, max_iters=0, init_from=str(initial),
                      **{"optim.schedule": "plateau", "optim.lr": 1e-4}))
    state = torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)
    assert [r["iteration"] for r in state["progress"]["history"]] == [0]
    assert state["progress"]["best_score"] is not None
    assert state["schedule"]["plateau_best"] is None and state["schedule"]["plateau_bad"] == 0


def test_token_kd_step_adds_weighted_kl(tiny_data, initial, tmp_path):
    teacher = load_checkpoint(initial).model  # the student starts from other weights (seed 2)
    train(make_config(tiny_data, tmp_path, max_iters=1, seed=2, **{"kd.teacher": str(initial), "kd.weight": 0.5}))
    student_start = tmp_path / "start"
    train(make_config(tiny_data, student_start, max_iters=0, seed=2))
    model = load_checkpoint(student_start / "last").model.train()
    batch = _first_batch(tiny_data, seed=2)
    logprobs = model(batch.att_feats, batch.att_masks, batch.labels[:, :-1])
    xe, count = cross_entropy(logprobs, batch.labels[:, 1:], batch.masks[:, 1:])
    with torch.no_grad():
        teacher_lp = teacher(batch.att_feats, batch.att_masks, batch.labels[:, :-1])
    kl, _ = token_kl(logprobs, teacher_lp, batch.masks[:, 1:])
    assert kl.item() > 0
    loss = (xe + 0.5 * kl) / count
    assert _train_record(tmp_path)["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_token_kd_teacher_runs_with_dropout_as_the_reference(tiny_data, initial, tmp_path):
    """The reference's train() call reaches its teacher, so the teacher's dropout is on; teacher_dropout=false
    gives the eval-mode teacher's KL exactly."""
    train(make_config(tiny_data, tmp_path / "teacher", max_iters=0, seed=3, **{"model.dropout": 0.5}))
    kd = {"kd.teacher": str(tmp_path / "teacher" / "last"), "kd.weight": 1.0}
    teacher = load_checkpoint(tmp_path / "teacher" / "last").model.eval()
    student = load_checkpoint(initial).model.train()
    batch = _first_batch(tiny_data, seed=2)
    logprobs = student(batch.att_feats, batch.att_masks, batch.labels[:, :-1])
    xe, count = cross_entropy(logprobs, batch.labels[:, 1:], batch.masks[:, 1:])
    with torch.no_grad():
        kl, _ = token_kl(logprobs, teacher(batch.att_feats, batch.att_masks, batch.labels[:, :-1]),
                         batch.masks[:, 1:])
    eval_mode = ((xe + kl) / count).item()
    losses = {}
    for dropout in (False, True):
        out = tmp_path / f"student-{dropout}"
        train(make_config(tiny_data, out, max_iters=1, seed=2, init_from=str(initial),
                          **kd, **{"kd.teacher_dropout": dropout}))
        losses[dropout] = _train_record(out)["loss"]
    assert losses[False] == pytest.approx(eval_mode, rel=1e-5)
    assert losses[True] != pytest.approx(eval_mode, rel=1e-4)  # ten times the tolerance of the match above


@pytest.mark.parametrize("features, feature_dim, differs", [
    (FeatureSpec(norm_att_feat=True), 12, "norm_att_feat True (this run: False)"),
    (FeatureSpec(use_box=True), 17, "17 numbers per region (this run: 12), use_box True (this run: False)"),
])
def test_a_token_kd_teacher_of_other_region_features_is_refused_at_the_start(tiny_data, initial, tmp_path, features,
                                                                             feature_dim, differs):
    """The teacher reads the student's regions: other ones would fail in the first step's forward, naming the
    student's size, or (normalised otherwise) teach from features it never saw."""
    start = load_checkpoint(initial)
    config = dataclasses.replace(start.config, att_feat_size=feature_dim)
    teacher = save_checkpoint(tmp_path / "teacher", SATModel(config), start.vocab, features)
    out = tmp_path / "student"
    with pytest.raises(SaticError, match=re.escape(f"kd.teacher={teacher} was trained on other region features: "
                                                   f"{differs}; set data.features")):
        train(make_config(tiny_data, out, **{"kd.teacher": str(teacher), "kd.weight": 0.5}))
    assert not (out / "last").exists()


def test_accumulating_two_batches_equals_one_double_batch(tiny_data, tmp_path):
    settings = {"max_iters": 2, "optim.eps": 1e-4}  # eps: see test_training_ddp (rounding-level gradients)
    train(make_config(tiny_data, tmp_path / "big", **settings))
    train(make_config(tiny_data, tmp_path / "accum", **settings, **{"data.batch_size": 2, "optim.accum_steps": 2}))
    big, accum = weights(tmp_path / "big" / "last"), weights(tmp_path / "accum" / "last")
    for name in big:
        torch.testing.assert_close(accum[name], big[name], rtol=0, atol=1e-6, msg=name)
    assert _train_record(tmp_path / "accum")["loss"] == pytest.approx(_train_record(tmp_path / "big")["loss"], rel=1e-6)


def test_one_process_trains_on_batches_of_a_single_image(tiny_data, tmp_path):
    """data.batch_size=1 is a whole global batch for one process (only more processes than images are refused)."""
    result = train(make_config(tiny_data, tmp_path / "run", max_iters=1, **{"data.batch_size": 1}))
    assert result.iterations == 1 and result.last is not None


@pytest.mark.parametrize("field, value, message", [
    ("num_layers", 10**12, r"^config.model describes a model \(num_layers 1000000000000, d_model 16, d_ff 32, "
                           r"max_positions 64\) of [\d,.]+ GiB, more than the [\d,.]+ GiB of cpu; check its sizes$"),
    ("d_model", 2**70, r"^config.model: cannot build the model it describes \(num_layers 1, d_model "
                       r"1180591620717411303424, d_ff 32, max_positions 64: TypeError: .*\); check its sizes$"),
], ids=["num_layers", "d_model-past-int64"])
def test_a_model_section_no_machine_can_hold_is_refused_before_it_is_built(tiny_data, tmp_path, field, value,
                                                                          message):
    """A size with digits too many: named with the machine's memory (its layers are not built one by one to
    find out), or as a number torch cannot take, not a traceback from torch."""
    with pytest.raises(SaticError, match=message):
        train(make_config(tiny_data, tmp_path / "run", **{f"model.{field}": value}))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("field", ["batch_size", "seq_per_img"])
def test_a_batch_no_machine_can_hold_is_refused_before_the_loader_gathers_it(tiny_data, tmp_path, field):
    sizes = {"data.batch_size": 4, "data.seq_per_img": 2, f"data.{field}": 10**15}
    message = (rf"^data.batch_size={sizes['data.batch_size']} images x data.seq_per_img={sizes['data.seq_per_img']} "
               rf"captions of up to \d+ words need, for one batch's word log-probs alone, [\d,.]+ GiB, more than the "
               rf"[\d,.]+ GiB of cpu; lower data.batch_size or data.seq_per_img$")
    with pytest.raises(SaticError, match=message):
        train(make_config(tiny_data, tmp_path / "run", max_iters=1, **sizes))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
