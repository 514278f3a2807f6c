"""Self-critical training as the reference trains: its loss on its own draws (fixture), one dropout
realisation per step, each row's own step 0, and a stage that continues the previous one's optimizer."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu

from satic.data.dataset import CaptionData, CaptionLoader
from satic.decoding import DecodeOptions, Decoder, decode, draw_logprobs, output_rows
from satic.decoding.search import choose
from satic.errors import SaticError
from satic.evaluation.cider import CiderD
from satic.evaluation.document_frequency import DocumentFrequency
from satic.model import SATModel
from satic.model.checkpoint import load_checkpoint
from satic.model.transformer import GrowingKV, block_mask, mask_bias
from satic.training.losses import reward_mask
from satic.training.scst import advantages, caption_rewards, policy_loss
from satic.training.state import load_state
from satic.training.trainer import Objective, scst_loss, train
from training_helpers import make_config, weights

GROUP_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def reference(reference_sat, reference_fixture):
    """The fixture's model (eval mode) for each K, its padded features and masks, and scst.npz."""
    feats = reference_sat.features
    models = {k: reference_sat(k) for k in GROUP_SIZES}
    scst = dict(np.load(reference_fixture / "scst.npz"))
    return models, torch.from_numpy(feats["att_feats_padded"]), torch.from_numpy(feats["att_masks"]) > 0, scst


@pytest.mark.parametrize("k", GROUP_SIZES)
def test_policy_loss_equals_the_reference_on_its_own_draws(reference, k):
    models, feats, masks, scst = reference
    draws = torch.from_numpy(scst[f"K{k}_raw_draws"])
    adv = torch.from_numpy(scst[f"K{k}_advantages"])
    assert torch.equal(output_rows(draws, k), torch.from_numpy(scst[f"K{k}_seq"]))
    assert torch.equal(reward_mask(output_rows(draws, k)), torch.from_numpy(scst[f"K{k}_mask"]))
    with torch.no_grad():
        logprobs = draw_logprobs(models[k], feats, masks, draws)
        loss = policy_loss(models[k], feats, masks, draws, adv)
        output = policy_loss(models[k], feats, masks, draws, adv, semantics="output")
    torch.testing.assert_close(logprobs, torch.from_numpy(scst[f"K{k}_logprobs"]), atol=1e-5, rtol=0)
    assert loss.item() == pytest.approx(float(scst[f"K{k}_loss"]), abs=1e-5)
    # K = 1 has no word after a finishing 0, so the two semantics agree only there
    assert (output.item() == pytest.approx(loss.item(), abs=1e-6)) == (k == 1)


@pytest.mark.parametrize("k", GROUP_SIZES)
def test_sampler_returns_its_draws_and_their_logprobs(reference, k):
    """The sampler's draws give its output by the finishing rule, and their log-probs are what one
    parallel pass over the same draws gives (dropout off), also where the output is 0."""
    models, feats, masks, _ = reference
    options = DecodeOptions(sample_method="sample", sample_n=5)
    result = decode(models[k], feats, masks, options, generator=torch.Generator().manual_seed(k))
    assert torch.equal(result.seq, output_rows(result.draws, k))
    drawn_after_end = (result.draws != result.seq) & (result.draws > 0)
    assert bool(drawn_after_end.any())  # rows go on drawing after they finished while others run
    torch.testing.assert_close(result.draw_logprobs, draw_logprobs(models[k], feats, masks, result.draws),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(result.logprobs, result.draw_logprobs * (result.logprobs != 0), atol=0, rtol=0)


def test_policy_loss_names_bad_input(reference):
    models, feats, masks, scst = reference
    draws = torch.from_numpy(scst["K2_raw_draws"])
    adv = torch.from_numpy(scst["K2_advantages"])
    with pytest.raises(SaticError, match="29 rows of draws do not divide evenly among 6 images"):
        policy_loss(models[2], feats, masks, draws[:29], adv[:29])
    with pytest.raises(SaticError, match=r"advantages have shape \(29,\) but there are 30 rows"):
        policy_loss(models[2], feats, masks, draws, adv[:29])
    with pytest.raises(SaticError, match=r"advantages have shape \(30, 1\) but there are 30 rows"):
        policy_loss(models[2], feats, masks, draws, adv[:, None])  # would broadcast to (30, 30, T)
    with pytest.raises(SaticError, match="semantics='outputs'"):
        policy_loss(models[2], feats, masks, draws, adv, semantics="outputs")
    with pytest.raises(SaticError, match="word ids"):
        policy_loss(models[2], feats, masks, draws.float(), adv)
    with pytest.raises(SaticError, match=r"draws must be \(rows, length\) word ids, got shape \(600,\)"):
        policy_loss(models[2], feats, masks, draws.reshape(-1), adv)


def test_policy_loss_of_a_caption_that_ends_at_once_counts_its_end_alone(reference):
    """A row that draws 0 first has one counted word, its end: the loss is -advantage * log p(0) at position 0."""
    models, feats, masks, _ = reference
    draws = torch.zeros(1, 16, dtype=torch.long)
    with torch.no_grad():
        loss = policy_loss(models[1], feats[:1], masks[:1], draws, torch.tensor([2.0]))
        logprobs = draw_logprobs(models[1], feats[:1], masks[:1], draws)
    assert logprobs[0, 1:].eq(0).all()
    assert loss.item() == pytest.approx(-2.0 * logprobs[0, 0].item(), rel=1e-6)


def test_first_step_is_shared_by_an_images_rows_only_without_dropout(reference):
    """Step 0 feeds every row of an image the same K zeros; with dropout each row draws its own masks."""
    models, feats, masks, _ = reference
    model = SATModel(dataclasses.replace(models[2].config, dropout=0.5))
    model.load_state_dict(models[2].state_dict())
    zeros = torch.zeros(6 * 3, 2, dtype=torch.long)
    for training in (False, True):
        model.train(training)
        logprobs = Decoder(model).prefill(feats, masks, 3, 20).step(zeros).view(6, 3, 2, -1)
        rows_equal = torch.equal(logprobs[:, 0], logprobs[:, 1]) and torch.equal(logprobs[:, 1], logprobs[:, 2])
        assert rows_equal == (not training)


def _first_batch(data_dir, start=0):
    data = CaptionData.from_dir(data_dir, data_dir / "feats_att")
    loader = CaptionLoader(data, "train", batch_size=4, seq_per_img=2, seed=1)
    loader.next_batch = start
    return next(iter(loader))


def _sampled_loss(model, batch, data_dir, k, max_length=8, baseline="new", bleu=None, bleu_weight=0.0,
                  prefix_dropout="fresh"):
    """The reference's SCST loss computed directly: sample with autograd on (its _sample loop with the
    dropout stream and sampling generator the trainer seeds), reward, RewardCriterion. Each step runs the
    decoder over the whole prefix again (its SAT core(): new dropout masks at every position; the top layer
    for the newest group alone, which tests/decoding shows gives the full re-run's numbers under its masks);
    prefix_dropout='kept' instead keeps the prefix's keys/values. baseline 'greedy': the reward of each
    image's greedy caption, decoded in eval mode (no dropout) to the same max_length; bleu(rows, references)
    * bleu_weight is added to every reward, the greedy ones too."""
    torch.manual_seed(1000)
    generator = torch.Generator().manual_seed(1000)
    options = DecodeOptions(sample_method="sample", sample_n=2, max_length=max_length)
    memory, bias = model.encode(batch.att_feats, batch.att_masks)
    memory_kv = model.memory_kv(memory, bias)
    caches = [GrowingKV() for _ in range(model.config.num_layers)]
    rows = memory.size(0) * 2
    it = torch.zeros(rows, k, dtype=torch.long)
    ys = it[:, :0]  # the prefix fed so far
    seq = torch.zeros(rows, max_length, dtype=torch.long)
    logprobs = torch.zeros(rows, max_length)
    unfinished = torch.ones(rows, dtype=torch.bool)
    for t in range(0, max_length - k + 1, k):
        if prefix_dropout == "fresh":
            ys = torch.cat([ys, it], 1)
            self_bias = mask_bias(block_mask(ys.size(1), k), memory.dtype)
            lp = model.logprobs(model.decode(ys, memory_kv, bias, self_bias, last=k))
        else:
            lp = model.logprobs(model.decode(it, memory_kv, bias, None, caches, torch.arange(t, t + k)))
        words = torch.stack([choose(lp[:, i].detach(), options, generator) for i in range(k)], 1)
        logprobs[:, t : t + k] = lp.gather(2, words[..., None])[..., 0]
        it = words * unfinished[:, None]
        seq[:, t : t + k] = it
        unfinished &= (it > 0).all(1)
        if not unfinished.any():
            break
    cider = CiderD(DocumentFrequency.load(data_dir / "cider_df.json"))

    def reward(rows):
        total = cider.score_token_ids(rows.numpy(), batch.gts)
        return total + bleu_weight * bleu(rows.numpy(), batch.gts) if bleu_weight else total

    greedy_rewards = None
    if baseline == "greedy":
        model.eval()
        with torch.no_grad():
            greedy_rewards = reward(decode(model, batch.att_feats, batch.att_masks,
                                           DecodeOptions(max_length=max_length)).seq)
        model.train()
    adv = torch.as_tensor(advantages(reward(seq), 2, baseline, greedy_rewards), dtype=torch.float32)
    mask = reward_mask(seq)
    return -(logprobs * adv[:, None] * mask).sum() / mask.sum()


def _train_loss(out_dir, iteration=1):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "train" and r["iteration"] == iteration)["loss"]


DROPOUT_RUN = {"model.group_size": 2, "model.dropout": 0.3, "model.att_dropout": 0.2, "scst.after_epoch": 0,
               "optim.eps": 1.0}  # eps 1: Adam's first step is lr * g / (|g| + 1), about lr * g


def test_scst_step_backpropagates_through_the_pass_that_drew_the_words(tiny_data, tmp_path):
    """With dropout on, the trainer's loss and update equal autograd through its own sampling pass:
    the words and their log-probs come from the same dropout masks. Re-scoring the words in a second
    pass (scst.logprobs=rescore) draws other masks and gives another loss."""
    train(make_config(tiny_data, tmp_path / "init", max_iters=0, **DROPOUT_RUN))
    start = tmp_path / "init" / "last"
    train(make_config(tiny_data, tmp_path / "run", max_iters=1, init_from=str(start), **DROPOUT_RUN))
    model = load_checkpoint(start).model.train()
    loss = _sampled_loss(model, _first_batch(tiny_data), tiny_data, 2)
    assert _train_loss(tmp_path / "run") == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    model.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
    torch.optim.Adam(model.parameters(), lr=1 / 32, betas=(0.9, 0.98), eps=1.0).step()  # noam step 1
    for name, value in weights(tmp_path / "run" / "last").items():  # gradients to 1e-6 * 32
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    train(make_config(tiny_data, tmp_path / "rescore", max_iters=1, init_from=str(start), **DROPOUT_RUN,
                      **{"scst.logprobs": "rescore"}))
    assert _train_loss(tmp_path / "rescore") != pytest.approx(loss.item(), rel=1e-3)


def test_scst_prefix_dropout_kept_samples_over_the_cache(tiny_data, tmp_path):
    """scst.prefix_dropout=kept: the words already drawn keep the keys/values (and dropout masks) of the step
    that computed them; its loss and update equal autograd through that cached pass, and differ from the
    reference's re-run of the prefix."""
    kept = {**DROPOUT_RUN, "scst.prefix_dropout": "kept"}
    train(make_config(tiny_data, tmp_path / "init", max_iters=0, **kept))
    start = tmp_path / "init" / "last"
    train(make_config(tiny_data, tmp_path / "run", max_iters=1, init_from=str(start), **kept))
    model = load_checkpoint(start).model.train()
    loss = _sampled_loss(model, _first_batch(tiny_data), tiny_data, 2, prefix_dropout="kept")
    assert _train_loss(tmp_path / "run") == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    loss.backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
    torch.optim.Adam(model.parameters(), lr=1 / 32, betas=(0.9, 0.98), eps=1.0).step()
    for name, value in weights(tmp_path / "run" / "last").items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    fresh = _sampled_loss(load_checkpoint(start).model.train(), _first_batch(tiny_data), tiny_data, 2)
    assert fresh.item() != pytest.approx(loss.item(), rel=1e-3)


def test_rescore_samples_as_the_default_does(tiny_data, tmp_path):
    """scst.logprobs=rescore draws its words as the default's sampling pass does, fresh masks over the whole
    prefix at every step (the same words under the same seeds), only without autograd; its log-probs then come
    from a second pass."""
    train(make_config(tiny_data, tmp_path / "init", max_iters=0, **DROPOUT_RUN))
    model = load_checkpoint(tmp_path / "init" / "last").model.train()
    batch = _first_batch(tiny_data)
    cider = CiderD(DocumentFrequency.load(tiny_data / "cider_df.json")).score_token_ids
    rewards = {}
    for logprobs in ("sampling", "rescore"):
        config = make_config(tiny_data, tmp_path / logprobs, **DROPOUT_RUN, **{"scst.logprobs": logprobs})
        torch.manual_seed(3)
        _, rewards[logprobs] = scst_loss(Objective(model), model, batch, config, cider, None,
                                         torch.Generator().manual_seed(3))
    assert len(set(rewards["sampling"].tolist())) > 1
    np.testing.assert_array_equal(rewards["rescore"], rewards["sampling"])


def word_sum(candidates, references):
    """A stand-in BLEU scorer for the trainer's reward sums: the sum of each row's word ids / 100."""
    return candidates.sum(1) / 100.0


def test_scst_greedy_baseline_and_bleu_reward_as_the_reference(tiny_data, tmp_path, monkeypatch):
    """baseline 'greedy' subtracts the reward of each image's greedy caption (eval mode, decoded to
    scst.max_length), and the BLEU weight adds weight * BLEU to the samples' and the greedy captions'
    rewards alike (a stand-in scorer: the untrained model's BLEU-4 is ~1e-12)."""
    import satic.training.data

    monkeypatch.setattr(satic.training.data, "bleu4_scorer", word_sum)
    run = {**DROPOUT_RUN, "scst.baseline": "greedy", "scst.bleu_weight": 0.5, "scst.max_length": 4}
    train(make_config(tiny_data, tmp_path / "init", max_iters=0, **run))
    start = tmp_path / "init" / "last"
    train(make_config(tiny_data, tmp_path / "run", max_iters=1, init_from=str(start), **run))
    model = load_checkpoint(start).model.train()
    batch = _first_batch(tiny_data)
    loss = _sampled_loss(model, batch, tiny_data, 2, 4, baseline="greedy", bleu=word_sum, bleu_weight=0.5)
    assert _train_loss(tmp_path / "run") == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    greedy = decode(model.eval(), batch.att_feats, batch.att_masks).seq
    assert bool((greedy[:, :5] > 0).all())  # the greedy captions are longer than scst.max_length
    for other in (dict(baseline="new"), dict(bleu_weight=0.0), dict(max_length=8)):  # and so does each part
        args = dict(max_length=4, baseline="greedy", bleu=word_sum, bleu_weight=0.5) | other
        changed = _sampled_loss(load_checkpoint(start).model.train(), batch, tiny_data, 2, **args)
        assert changed.item() != pytest.approx(loss.item(), rel=1e-3), other


def array_to_str(row) -> str:
    """The reference's rule: token ids up to and including the first 0, space separated."""
    words = [int(t) for t in row]
    return " ".join(map(str, words[: words.index(0) + 1] if 0 in words else words))


def test_bleu_reward_is_the_toolkits_bleu4_of_token_strings(capsys):
    """The reference's BLEU reward: Bleu(4).compute_score on the token-id strings (each cut after its first 0)
    with the toolkit's 'closest' reference length, the 4-gram score of each candidate."""
    from satic.training.data import bleu4_scorer

    refs = [np.array([[1, 2, 3, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]),
            np.array([[5, 6, 7, 8, 9, 0, 0, 0, 0, 0], [5, 6, 7, 8, 3, 0, 0, 0, 0, 0]])]
    cands = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 0, 0],  # 9 words with its end: the closest reference has 10
                      [1, 2, 3, 0, 7, 7, 7, 7, 7, 7],  # equal to a reference: BLEU-4 1
                      [5, 6, 7, 8, 9, 0, 0, 0, 0, 0],
                      [5, 6, 7, 8, 3, 3, 0, 0, 0, 0]])
    got = bleu4_scorer(cands, refs)
    assert capsys.readouterr().out == ""  # the toolkit's statistics are not printed at every step
    gts = {i: [array_to_str(r) for r in refs[i // 2]] for i in range(4)}
    _, expected = Bleu(4).compute_score(gts, {i: [array_to_str(c)] for i, c in enumerate(cands)}, verbose=0)
    np.testing.assert_allclose(got, expected[3], rtol=1e-12, atol=0)
    assert got[1] == pytest.approx(1.0) and got[2] == pytest.approx(1.0)
    # all 9 unigrams (the end "0" too), 7 of 8 bigrams, 6 of 7 trigrams and 5 of 6 4-grams match; the brevity
    # penalty is against the closest reference, of 10 words (the shortest, of 4, would give none)
    assert got[0] == pytest.approx(math.exp(1 - 10 / 9) * (9 / 9 * 7 / 8 * 6 / 7 * 5 / 6) ** 0.25, rel=1e-6)


def test_continuing_a_run_keeps_its_adam_state_counters_and_best(tiny_data, tmp_path, capsys):
    """init_continue, as the reference's --start_from: the first SCST step is torch Adam's step from the
    XE run's saved state (its betas 0.9/0.98 and eps 1e-9, not this config's) at the new learning rate,
    on the next batch of the XE run's data order; the counters and the best score go on."""
    xe = tmp_path / "xe"
    train(make_config(tiny_data, xe, max_iters=3, save_every=1))
    xe_state = load_state(xe / "last")
    assert xe_state["progress"]["best_score"] is not None
    scst = make_config(tiny_data, tmp_path / "scst", max_iters=4, init_from=str(xe / "last"), init_continue=True,
                       **{"scst.after_epoch": 0, "optim.schedule": "constant", "optim.lr": 1e-3,
                          "optim.betas": [0.5, 0.5], "optim.eps": 0.5})
    capsys.readouterr()
    result = train(scst)
    assert result.iterations == 4
    assert (f"continuing {xe / 'last'} at iteration 3, epoch 0: Adam betas (0.9, 0.98), eps 1e-09 and moments from "
            f"there, best score {xe_state['progress']['best_score']} (CIDEr)\n") in capsys.readouterr().out
    model = load_checkpoint(xe / "last").model.train()
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(xe_state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    # no dropout: the trainer samples over the cache, the same function as the re-run (whose rounding would differ
    # in the key biases' gradients, which are 0 up to rounding and which Adam's eps 1e-9 scales up to lr)
    loss = _sampled_loss(model, _first_batch(tiny_data, start=3), tiny_data, 1, prefix_dropout="kept")
    assert _train_loss(tmp_path / "scst", iteration=4) == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
    optimizer.step()
    for name, value in weights(tmp_path / "scst" / "last").items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    state = load_state(tmp_path / "scst" / "last")
    group = state["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.98) and group["eps"] == 1e-9
    assert state["progress"]["iteration"] == 4 and state["loader"]["next_batch"] == 4
    assert state["progress"]["history"][:3] == xe_state["progress"]["history"]
    assert result.best_score >= xe_state["progress"]["best_score"]
    if result.best_score == xe_state["progress"]["best_score"]:  # not beaten: best/ is still the XE run's
        xe_best = weights(xe / "best")
        assert all(torch.equal(value, xe_best[name]) for name, value in weights(tmp_path / "scst" / "best").items())


def test_a_stage_from_init_never_keeps_a_best_below_its_start(tiny_data, tmp_path):
    """Without continuing, the starting weights are validated first: a stage that only gets worse keeps
    them as best/ (the reference keeps the XE run's best score for the same reason)."""
    trained = tmp_path / "xe"
    train(make_config(tiny_data, trained, max_iters=40, save_every=40, **{"optim.noam_warmup": 10}))
    start_score = load_state(trained / "last")["progress"]["best_score"]
    assert start_score > 0
    ruin = {"scst.after_epoch": 0, "optim.schedule": "constant", "optim.lr": 3.0, "save_every": 1, "max_iters": 2}
    result = train(make_config(tiny_data, tmp_path / "scst", init_from=str(trained / "last"), **ruin))
    history = load_state(tmp_path / "scst" / "last")["progress"]["history"]
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert result.best_metric == "CIDEr"  # against the data folder's raw references
    assert history[0]["CIDEr"] == pytest.approx(start_score)
    assert max(h["CIDEr"] for h in history[1:]) < start_score  # the stage only got worse
    assert result.best_score == pytest.approx(start_score)
    for name, value in weights(tmp_path / "scst" / "best").items():
        assert torch.equal(value, weights(trained / "last")[name])


def test_self_critical_training_starts_at_the_first_step_of_epoch_after_epoch(tiny_data, tmp_path):
    """scst.after_epoch=1: the 8 steps of epoch 0 (32 training images, 4 per batch) are XE, from the step after
    the one that ends the epoch on the steps are self-critical, each logging its mean reward."""
    from satic.training.monitor import read_log

    train(make_config(tiny_data, tmp_path, max_iters=10, **{"scst.after_epoch": 1}))
    records = [r for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "train"]
    assert [(r["iteration"], r["epoch"], "reward" in r) for r in records] == \
        [(i, int(i >= 8), i > 8) for i in range(1, 11)]


def test_new_and_greedy_baselines():
    rewards = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    assert advantages(rewards, 3, "new").tolist() == [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]
    assert advantages(rewards, 3, "greedy", np.array([1.0, 2.0])).tolist() == [0.0, 1.0, 2.0, -2.0, -2.0, 4.0]
    with pytest.raises(ValueError, match="the 'new' baseline needs at least 2 samples per image"):
        advantages(rewards, 1, "new")
    with pytest.raises(ValueError, match="the 'greedy' baseline needs the greedy captions' rewards"):
        advantages(rewards, 3, "greedy")


def test_caption_rewards_weights_and_image_grouping():
    gts = [np.array([[1, 2, 0]]), np.array([[3, 0, 0], [4, 0, 0]])]
    cands = np.array([[1, 2, 0], [1, 0, 0], [3, 0, 0], [5, 0, 0]])

    def exact(c, refs):
        per = len(c) // len(refs)
        return np.array([float(any(np.array_equal(x, y) for y in refs[i // per])) for i, x in enumerate(c)])

    def unused(c, refs):
        raise AssertionError("a scorer of weight 0 is not run")

    length = lambda c, r: np.array([float((x > 0).sum()) for x in c])
    got = caption_rewards(cands, gts, exact, 1.0, length, 0.5)
    assert got.tolist() == [2.0, 0.5, 1.5, 0.5]
    assert caption_rewards(cands, gts, exact, 1.0, length, 0.0).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert caption_rewards(cands, gts, exact, 1.0).tolist() == [1.0, 0.0, 1.0, 0.0]  # CIDEr alone by default
    assert caption_rewards(cands, gts, unused, 0.0, length, 0.5).tolist() == [1.0, 0.5, 0.5, 0.5]
    assert caption_rewards(cands, gts, exact, 1.0, unused, 0.0).tolist() == [1.0, 0.0, 1.0, 0.0]
    for bleu in ({"bleu": None}, {}):
        with pytest.raises(ValueError, match="needs a BLEU scorer"):
            caption_rewards(cands, gts, exact, 1.0, bleu_weight=0.5, **bleu)


def test_scst_max_length_shorter_than_a_group_is_refused_before_training(tiny_data, tmp_path):
    """scst.max_length < K leaves the sampler no whole group to draw (the reference returns empty captions
    whose loss has no gradient, and its backward fails): refused at the start, naming the option, not a raw
    torch error at the first self-critical step."""
    config = make_config(tiny_data, tmp_path / "run", max_iters=1, **{"model.group_size": 4, "scst.max_length": 3,
                                                                      "scst.after_epoch": 0})
    with pytest.raises(SaticError, match="scst.max_length=3 .*K=4"):
        train(config)
    assert not (tmp_path / "run" / "last").exists()
