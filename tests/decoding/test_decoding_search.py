import dataclasses
import math
import re
import warnings

import pytest
import torch

from satic.decoding import (DecodeOptions, DecodeResult, Decoder, Ensemble, RecomputeStepper, beam_search, decode,
                            prepare_for_inference, sequence_logprobs)
from satic.decoding.options import without_bad_endings
from satic.decoding.search import (choose, diversity_penalty, draw, forbid_repeat, live_groups, sample, select_beams,
                                   suppress_unk, trigram_penalty)
from satic.errors import SaticError
from satic.model.layers import Dropout
from satic.model.transformer import NEG_INF

VOCAB = 30


@pytest.mark.parametrize("k", [1, 2, 3])
def test_cached_step_equals_full_recomputation(k, sat, data):
    model = sat(k)
    feats, masks = data
    cached = Decoder(model).prefill(feats, masks, 2, 12)
    full = RecomputeStepper(model, feats, masks, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(12 // k):
            tokens = torch.randint(0, VOCAB + 1, (12, k), generator=g) if step else torch.zeros(12, k, dtype=torch.long)
            torch.testing.assert_close(cached.step(tokens), full.step(tokens), atol=1e-5, rtol=0)
            index = torch.arange(12).view(6, 2).flip(1).reshape(-1)  # swap the two rows of each image
            cached.reorder(index)
            full.reorder(index)


def end_aligned_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A dropout mask (keep_mask's form) fixed by each element's index counted from the end of every dimension:
    the last positions of a long and of a short sequence get the same mask, whatever the sequence's length."""
    index = torch.zeros((), dtype=torch.long)
    for size, weight in zip(shape, (7919, 104729, 1299709, 15485863)):
        index = index[..., None] + torch.arange(size - 1, -1, -1) * weight
    kept = (index * 2654435761 % 4093) % 2 == 0
    return kept.to(torch.float32) / (1.0 - p)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_differentiable_decodes_and_the_reference_rerun(k, sat, data, monkeypatch):
    """SCST's differentiable decodes. Without dropout the growing cache and the re-run prefix (rerun=True)
    step as the full recomputation does. With dropout (train mode) the re-run applies masks to the whole
    prefix each step as the reference's re-run does, and gives the full recomputation's numbers under the same
    masks, though its top layer computes the newest group alone; the growing cache keeps the prefix's masks
    from the step that computed it."""
    model = sat(k)
    feats, masks = data
    steps = [torch.zeros(6, k, dtype=torch.long)] + [torch.randint(1, VOCAB + 1, (6, k), generator=g)
                                                      for g in [torch.Generator().manual_seed(0)] for _ in range(3)]

    def run(make_stepper):
        stepper = make_stepper()
        return [stepper.step(tokens) for tokens in steps]

    decoder = Decoder(model)
    full = run(lambda: RecomputeStepper(model, feats, masks, 1))
    growing = run(lambda: decoder.prefill(feats, masks, 1, 12, differentiable=True))
    rerun = run(lambda: decoder.prefill(feats, masks, 1, 12, differentiable=True, rerun=True))
    for a, b, c in zip(full, growing, rerun):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=0)
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.5
    model.train()
    monkeypatch.setattr("satic.model.layers.keep_mask", end_aligned_mask)
    full = run(lambda: RecomputeStepper(model, feats, masks, 1))
    rerun = run(lambda: decoder.prefill(feats, masks, 1, 12, differentiable=True, rerun=True))
    growing = run(lambda: decoder.prefill(feats, masks, 1, 12, differentiable=True))
    for a, b in zip(full, rerun):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(growing[0], full[0], atol=1e-5, rtol=0)  # the same masks for the first group,
    assert (growing[-1] - full[-1]).abs().max() > 0.1  # not once the prefix is longer than it


def test_a_differentiable_decode_cannot_reorder_its_rows(sat, data):
    """Beam search reorders rows; a differentiable decode (growing cache or re-run prefix) only samples."""
    feats, masks = data
    decoder = Decoder(sat(2))
    for rerun in (False, True):
        state = decoder.prefill(feats, masks, 1, 12, differentiable=True, rerun=rerun)
        with pytest.raises(NotImplementedError, match="^a differentiable decode samples; beam search reorders"):
            state.reorder(torch.arange(feats.size(0)))


def test_the_rerun_computes_the_top_layer_for_the_newest_group_only(sat, data):
    """At each re-run step the layers below the top run over the whole prefix, the top layer's attention and
    feed-forward over the newest K positions only: at the fourth step of K=2 (a prefix of 8 positions), the top
    feed-forward sees 2 positions and the others 8."""
    model = sat(2).train()
    feats, masks = data
    seen: list[int] = []
    hooks = [layer.ffn.register_forward_hook(lambda m, args, out: seen.append(args[0].size(1)))
             for layer in model.decoder_layers]
    state = Decoder(model).prefill(feats, masks, 1, 12, differentiable=True, rerun=True)
    for _ in range(4):
        state.step(torch.ones(6, 2, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    layers = len(model.decoder_layers)
    assert seen[-layers:] == [8] * (layers - 1) + [2]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_gives_the_same_captions(k, beam, sat, data):
    model = sat(k)
    feats, masks = data
    opts = DecodeOptions(beam_size=beam, max_length=12)
    a = decode(model, feats, masks, opts)
    b = decode(model, feats, masks, opts, use_cache=False)
    assert torch.equal(a.seq, b.seq)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("beam", [1, 3])
def test_batched_equals_one_image_at_a_time(k, beam, sat, data):
    model = sat(k)
    feats, masks = data
    opts = DecodeOptions(beam_size=beam, n_best=beam)
    together = decode(model, feats, masks, opts)
    for i in range(feats.size(0)):
        n = int(masks[i].sum())
        alone = decode(model, feats[i : i + 1, :n], None, opts)
        rows = slice(i * beam, (i + 1) * beam)
        assert torch.equal(together.seq[rows], alone.seq)
        torch.testing.assert_close(together.logprobs[rows], alone.logprobs, atol=1e-5, rtol=0)
        # a score sums up to 20 log-probs, each close to 1e-5: rounding of 1e-6 of the sum's size is allowed
        torch.testing.assert_close(together.scores[rows], alone.scores, atol=1e-5, rtol=1e-6)


def cut(row: torch.Tensor) -> list[int]:
    words = row.tolist()
    return words[: words.index(0)] if 0 in words else words


@pytest.mark.parametrize("k", [1, 2, 4])
def test_beam_size_one_equals_greedy(k, sat, data):
    """Same caption; greedy keeps the words after the 0 in the finishing group, beam search cuts there."""
    model = sat(k)
    feats, masks = data
    opts = DecodeOptions(suppress_unk=False)
    greedy = decode(model, feats, masks, opts)
    with torch.no_grad():
        beam = beam_search(Decoder(model).prefill(feats, masks, 1, 20), feats.size(0), opts)
    for g_row, b_row, g_lp, b_lp in zip(greedy.seq, beam.seq, greedy.logprobs, beam.logprobs):
        assert cut(g_row) == cut(b_row)
        end = min(len(cut(g_row)) + 1, 20)
        torch.testing.assert_close(g_lp[:end], b_lp[:end], atol=1e-6, rtol=0)
        if k == 1:
            assert torch.equal(g_row, b_row)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_finishing_rule_any_zero_in_the_group(k, sat, data):
    model = sat(k)
    feats, masks = data
    result = decode(model, feats, masks)
    ended = 0
    for row, lp in zip(result.seq, result.logprobs):
        groups = row.view(-1, k)
        ends = [g for g in range(groups.size(0)) if (groups[g] == 0).any()]
        last = ends[0] if ends else groups.size(0) - 1
        ended += bool(ends)
        assert (groups[last + 1 :] == 0).all()
        assert (lp.view(-1, k)[last + 1 :] == 0).all()
        assert (lp.view(-1, k)[: last + 1] < 0).all()
    assert ended >= 3


def test_max_length_rule_t_plus_k(sat, data):
    model = sat(3)
    with torch.no_grad():
        model.generator.bias[0] = -100.0  # never ends: full-length captions
    feats, masks = data
    greedy = decode(model, feats, masks, DecodeOptions(max_length=10))
    assert greedy.seq.shape == (6, 10)
    assert (greedy.seq[:, :9] > 0).all() and (greedy.seq[:, 9] == 0).all()  # 3 groups of 3 fit in 10
    beam = decode(model, feats, masks, DecodeOptions(max_length=10, beam_size=2))
    assert (beam.seq > 0).all()  # beam search fills up to position max_length - 1, as the reference


@pytest.mark.parametrize("beam", [1, 2])
def test_a_max_length_of_one_group_decodes_that_group(beam, sat, data):
    """max_length = K holds exactly one group: its words are the first group of a longer decode; one position
    less is refused."""
    model = sat(4)
    feats, masks = data
    short = decode(model, feats, masks, DecodeOptions(max_length=4, beam_size=beam, suppress_unk=False))
    longer = decode(model, feats, masks, DecodeOptions(max_length=20, suppress_unk=False))
    assert short.seq.shape == (6, 4)
    if beam == 1:
        assert torch.equal(short.seq, longer.seq[:, :4])
        torch.testing.assert_close(short.logprobs, longer.logprobs[:, :4], atol=1e-5, rtol=0)
    with pytest.raises(SaticError, match=r"^max_length 3 is shorter than one group of K=4 words$"):
        decode(model, feats, masks, DecodeOptions(max_length=3, beam_size=beam))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sequence_logprobs_match_sampling(k, sat, data):
    model = sat(k)
    feats, masks = data
    opts = DecodeOptions(sample_method="sample", sample_n=3, max_length=10, temperature=0.8)
    result = decode(model, feats, masks, opts, generator=torch.Generator().manual_seed(3))
    assert result.seq.shape == (18, 10)
    scored = sequence_logprobs(model, feats, masks, result.seq)
    torch.testing.assert_close(scored, result.logprobs, atol=1e-5, rtol=0)
    scored.sum().backward()
    assert model.generator.weight.grad is not None and model.generator.weight.grad.abs().sum() > 0


def test_rows_to_score_must_be_a_matrix_of_word_ids(sat, data):
    model = sat(2)
    feats, masks = data
    for bad in (torch.ones(12, dtype=torch.long), torch.ones(6, 4)):  # one dimension; words as floats
        message = f"seq must be a (rows, length) tensor of word ids, got {tuple(bad.shape)} {bad.dtype}"
        with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
            sequence_logprobs(model, feats, masks, bad)


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_log_probs_of_one_word_rows_at_k_1(method, sat, data):
    """At K=1 and max_length 1 every row is one word: the parallel passes give its log-prob, as decoding did."""
    from satic.decoding import draw_logprobs

    model = sat(1)
    feats, masks = data
    result = decode(model, feats, masks, DecodeOptions(sample_method=method, max_length=1),
                    generator=torch.Generator().manual_seed(0))
    assert bool((result.logprobs < 0).all())
    torch.testing.assert_close(sequence_logprobs(model, feats, masks, result.seq), result.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(draw_logprobs(model, feats, masks, result.draws), result.draw_logprobs, atol=1e-5,
                               rtol=0)


def test_sampling_is_reproducible_and_filters_reduce_to_greedy(sat, data):
    model = sat(2)
    feats, masks = data
    opts = DecodeOptions(sample_method="sample", max_length=10)
    a = decode(model, feats, masks, opts, generator=torch.Generator().manual_seed(5))
    b = decode(model, feats, masks, opts, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.seq, b.seq)
    greedy = decode(model, feats, masks, DecodeOptions(max_length=10)).seq
    for narrow in (dict(top_k=1), dict(top_p=1e-4), dict(temperature=1e-4)):
        sampled = decode(model, feats, masks, dataclasses.replace(opts, **narrow),
                         generator=torch.Generator().manual_seed(1))
        assert torch.equal(sampled.seq, greedy), narrow


@pytest.mark.parametrize("beam", [1, 3])
def test_decoding_constraint_never_repeats_a_word(beam, sat, data):
    model = sat(1)
    with torch.no_grad():  # make repeating the previous word very attractive
        model.word_embed.weight.mul_(0.0)
    feats, masks = data
    def repeats(seq: torch.Tensor) -> int:
        return sum(a == b for row in seq for a, b in zip(cut(row), cut(row)[1:]))

    assert repeats(decode(model, feats, masks, DecodeOptions(max_length=10, beam_size=beam)).seq) > 0
    constrained = decode(model, feats, masks, DecodeOptions(max_length=10, beam_size=beam, decoding_constraint=True))
    assert repeats(constrained.seq) == 0 and len(cut(constrained.seq[0])) > 3


def test_trigram_penalty_counts_earlier_occurrences():
    prefix = torch.tensor([[1, 2, 3, 1, 2, 5, 1, 2]])  # (1, 2) was followed by 3 and by 5
    penalty = trigram_penalty(prefix, 7)
    expected = torch.zeros(1, 7)
    expected[0, 3] = expected[0, 5] = -0.693 * 2
    assert torch.equal(penalty, expected)


def test_n_best_rows_are_ranked_and_length_penalty_is_applied(sat, data):
    model = sat(2)
    feats, masks = data
    best = decode(model, feats, masks, DecodeOptions(beam_size=4, n_best=4))
    one = decode(model, feats, masks, DecodeOptions(beam_size=4))
    assert torch.equal(best.seq.view(6, 4, 20)[:, 0], one.seq)
    scores = best.scores.view(6, 4)
    assert (scores[:, 1:] <= scores[:, :-1]).all()
    for alpha, name in ((0.7, "wu_0.7"), (1.0, "avg_1")):
        result = decode(model, feats, masks, DecodeOptions(beam_size=3, length_penalty=name))
        for row, lp, score in zip(result.seq, result.logprobs, result.scores):
            length = len(cut(row)) + (1 if 0 in row.tolist() else 0)
            total = lp.double().sum()
            expected = total / length if name.startswith("avg") else total / (((5 + length) / 6) ** alpha)
            assert score.item() == pytest.approx(expected.item(), abs=1e-4)


def test_diverse_groups_start_with_different_words(sat, data):
    model = sat(1)
    feats, masks = data
    result = decode(model, feats, masks, DecodeOptions(beam_size=4, beam_groups=2, diversity_lambda=100.0,
                                                       max_length=10, n_best=4))
    firsts = result.seq[:, 0].view(6, 2, 2)  # (image, group, beam)
    for image in firsts:
        assert not set(image[0].tolist()) & set(image[1].tolist())


def test_two_diverse_groups_run_staggered_at_k_1(sat, data):
    """Diverse beam search at K=1 runs each group a position behind the one before, as the reference, with two
    groups too: the second group's captions are the staggered search's, not those of groups advancing together."""
    from satic.decoding.search import staggered_beam_search, start

    model = sat(1)
    feats, masks = data
    opts = DecodeOptions(beam_size=4, beam_groups=2, n_best=4, diversity_lambda=2.0, max_length=10)
    got = decode(model, feats, masks, opts)
    with torch.no_grad():
        staggered = staggered_beam_search(lambda: start(model, feats, masks, 2, 10), feats.size(0), opts)
        together = beam_search(start(model, feats, masks, 4, 10), feats.size(0), opts)
    assert torch.equal(got.seq, staggered.seq)
    torch.testing.assert_close(got.scores, staggered.scores, atol=1e-5, rtol=0)
    first, second = (torch.cat([r.seq.view(6, 2, 2, 10)[:, g] for r in (together, staggered)], 1) for g in (0, 1))
    assert torch.equal(first[:, :2], first[:, 2:])  # the first group depends on no other
    assert not torch.equal(second[:, :2], second[:, 2:])


@pytest.mark.parametrize("beam", [1, 3])
def test_ensemble_of_copies_equals_the_model(beam, sat, data):
    model = sat(2)
    feats, masks = data
    opts = DecodeOptions(beam_size=beam, max_length=10)
    single = decode(model, feats, masks, opts)
    for ensemble in (Ensemble([model]), Ensemble([model, sat(2)], weights=[2.0, 1.0])):
        result = decode(ensemble, feats, masks, opts)
        assert torch.equal(result.seq, single.seq)
        torch.testing.assert_close(result.logprobs, single.logprobs, atol=1e-5, rtol=0)
    with pytest.raises(SaticError, match="agree"):
        Ensemble([model, sat(1)])


def test_ensemble_averages_probabilities(sat, data):
    """The log of the members' weighted mean probabilities, whatever their caches and however far apart their
    weights; a single member gives its own log-probs to the bit."""
    a, b = sat(1, seed=0), sat(1, seed=1)
    feats, masks = data
    steppers = [Decoder(m).prefill(feats, masks, 1, 6) for m in (a, b)]
    from satic.decoding.ensemble import EnsembleStepper

    ensemble = EnsembleStepper([Decoder(m).prefill(feats, masks, 1, 4) for m in (a, b)], [3.0, 1.0])
    uncached = EnsembleStepper([Decoder(a).prefill(feats, masks, 1, 4), RecomputeStepper(b, feats, masks, 1)], [3, 1])
    far_apart = EnsembleStepper([Decoder(m).prefill(feats, masks, 1, 4) for m in (a, b)], [1.0, 2.0 ** -140])
    alone = EnsembleStepper([Decoder(a).prefill(feats, masks, 1, 6)], [3.0])
    tokens = torch.zeros(6, 1, dtype=torch.long)
    with torch.no_grad():
        first = steppers[0].step(tokens)
        expected = (0.75 * first.exp() + 0.25 * steppers[1].step(tokens).exp()).log()
        torch.testing.assert_close(ensemble.step(tokens), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(uncached.step(tokens), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(far_apart.step(tokens), first, atol=1e-6, rtol=0)
        assert torch.equal(alone.step(tokens), first)
        for words in torch.arange(1, VOCAB + 1).view(6, -1).split(1, 1):  # every word, 5 steps
            assert torch.equal(alone.step(words), steppers[0].step(words))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_scores_close_to_fp32(precision, sat, data):
    model = sat(2)
    feats, masks = data
    reference = decode(model, feats, masks, DecodeOptions(max_length=10))
    fast = prepare_for_inference(model, precision)
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    result = decode(fast, feats, masks, DecodeOptions(max_length=10))
    assert result.seq.shape == reference.seq.shape
    with torch.no_grad():
        rescored = sequence_logprobs(fast, feats, masks, reference.seq)
    torch.testing.assert_close(rescored, reference.logprobs, atol=0.15, rtol=0)
    assert torch.equal(prepare_for_inference(model, "fp32").generator.weight, model.generator.weight)
    assert torch.equal(prepare_for_inference(model).generator.weight, model.generator.weight)  # fp32 by default
    if precision == "bf16":
        assert {p.dtype for p in fast.parameters()} == {torch.bfloat16} and rescored.dtype == torch.float32
    with pytest.raises(SaticError, match="precision"):
        prepare_for_inference(model, "fp8")


def test_bad_options_and_inputs(sat, data):
    with pytest.raises(ValueError):
        DecodeOptions(sample_method="nucleus")
    with pytest.raises(ValueError):
        DecodeOptions(beam_size=4, beam_groups=3)
    for bad in ("wu", "wu_", "wu_nan", "xx_1", "wu_1_2"):
        with pytest.raises(ValueError):
            DecodeOptions(length_penalty=bad)
    for good in ("wu_0.9", "wu_-0.5", "wu_1e-1", "avg_2"):  # whatever the reference's float(alpha) reads
        DecodeOptions(beam_size=2, length_penalty=good)
    with pytest.raises(ValueError):
        DecodeOptions(beam_size=2, n_best=3)
    # values whose arithmetic leaves float range: scores of +-inf or NaN, draws of garbage
    for bad, message in ((dict(temperature=float("nan")), "temperature must be positive"),
                         (dict(temperature=1e-45), "temperature must be a finite number of at least 1e-30"),
                         (dict(temperature=float("inf")), "temperature must be a finite number"),
                         # infinite in float32, where log-probs are divided: a forbidden word's -inf / inf is NaN
                         (dict(temperature=1e39), r"at most 3\.40282e\+38, float32's largest"),
                         (dict(top_k=2**63), "top_k must be a whole number"), (dict(top_k=2.0), "top_k"),
                         (dict(beam_size=2, beam_groups=2, diversity_lambda=-1e308), "diversity_lambda must be"),
                         (dict(diversity_lambda=float("nan")), "diversity_lambda must be"),
                         (dict(beam_size=2, length_penalty="wu_400"), r"with \|A\| <= 50"),
                         (dict(beam_size=2, length_penalty="avg_-51"), r"with \|A\| <= 50")):
        with pytest.raises(ValueError, match=message):
            DecodeOptions(**bad)
    DecodeOptions(sample_method="sample", temperature=1e-30, top_k=2**63 - 1)
    DecodeOptions(sample_method="sample", temperature=float(torch.finfo(torch.float32).max))
    model = sat(4)
    feats, masks = data
    with pytest.raises(SaticError, match=r"att_feats must be \(images >= 1, regions >= 1, dim\), got shape \(0, "):
        decode(model, feats[:0], masks[:0])
    with pytest.raises(SaticError, match=r"got shape \(2, 0, "):
        decode(model, feats[:2, :0], masks[:2, :0])
    with pytest.raises(SaticError, match="shorter than one group"):
        decode(model, feats, masks, DecodeOptions(max_length=3))
    with pytest.raises(SaticError, match="expects"):
        decode(model, feats[..., :5], masks)
    with pytest.raises(SaticError, match="mask"):
        decode(model, feats, masks[:, :3])
    with pytest.raises(SaticError, match="beams per group"):
        decode(model, feats, masks, DecodeOptions(beam_size=32))


def test_features_of_size_zero_are_a_wrong_feature_size_not_an_empty_batch(sat, data):
    model = sat(2)
    feats, masks = data
    message = (f"region features have shape (6, {feats.size(1)}, 0) but this model expects (batch, regions, 32); use "
               "features of size 32 or a model trained on yours")
    with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
        decode(model, feats[..., :0], masks)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("beam", [1, 3])
def test_traced_steps_give_the_same_captions(precision, beam, sat, data):
    model = prepare_for_inference(sat(2), precision)
    traced = Decoder.prepare(sat(2), precision, compile=True)
    feats, masks = data
    opts = DecodeOptions(beam_size=beam)
    expected = decode(model, feats, masks, opts)
    for _ in range(2):  # the second call reuses the trace
        result = decode(traced, feats, masks, opts)
        assert torch.equal(result.seq, expected.seq)
        torch.testing.assert_close(result.logprobs, expected.logprobs, atol=1e-5, rtol=0)


class ScriptedStepper:
    """Steps whose argmax is a given word per (row, step, position), with distinct log-probs per call."""

    def __init__(self, words: torch.Tensor) -> None:  # (R, steps, K)
        self.words, self.group_size, self.calls = words, words.size(2), 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        words = self.words[:, self.calls]
        self.calls += 1
        logprobs = torch.full((*words.shape, 6), -9.0 - self.calls)
        return logprobs.scatter(2, words[..., None], -0.5 - 0.1 * self.calls)


@pytest.mark.parametrize("k,length", [(1, 7), (2, 9), (3, 10), (4, 8)])
@pytest.mark.parametrize("rows", [1, 4])
def test_greedy_output_masks_follow_the_finishing_rule(k, length, rows):
    """The loop's own live mask equals live_groups of the output, for rows finishing at every step,
    never, or (one row) all at once; draws are kept up to the last step run."""
    g = torch.Generator().manual_seed(k * 10 + rows)
    steps = length // k
    for trial in range(8):
        words = torch.randint(1, 6, (rows, steps, k), generator=g)
        for r in range(rows):
            end = (trial + r) % (steps + 1)  # steps: never finishes
            if end < steps:
                words[r, end, int(torch.randint(0, k, (), generator=g))] = 0
        stepper = ScriptedStepper(words)
        result = sample(stepper, rows, DecodeOptions(max_length=length))
        live = live_groups(result.seq, k)
        ran = stepper.calls * k
        drawn = torch.nn.functional.pad(words.reshape(rows, -1)[:, :ran], (0, length - ran))  # (R, T)
        assert torch.equal(result.draws, drawn)
        assert torch.equal(result.seq, drawn * live)
        assert torch.equal(result.logprobs != 0, live)
        assert torch.equal(result.logprobs, result.draw_logprobs * live)
        torch.testing.assert_close(result.scores, result.logprobs.double().sum(1), atol=0, rtol=0)
        finished = (words.reshape(rows, -1) == 0).any(1)
        assert stepper.calls == (steps if not finished.all() else
                                 int(max((words[r] == 0).any(1).nonzero()[0, 0] for r in range(rows))) + 1)


def test_draw_follows_the_weights_and_never_picks_a_zero():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 2.0]]).repeat(20000, 1)  # (40000, 5)
    drawn = draw(weights, torch.Generator().manual_seed(0))
    first, second = drawn[0::2], drawn[1::2]
    assert set(first.tolist()) == {1, 3} and set(second.tolist()) == {0, 4}
    assert abs(float((first == 3).float().mean()) - 0.75) < 0.0125  # 4 standard deviations of a share of 20000
    assert abs(float((second == 0).float().mean()) - 0.5) < 0.014
    edge = torch.tensor([[0.0, 5.0, 0.0]])  # u = 0 and u near the total both land on the only weight
    assert all(int(draw(edge, torch.Generator().manual_seed(s))[0]) == 1 for s in range(50))


def test_every_recorded_backend_gives_the_same_captions(sat, data):
    """torch.export behind the same Decoder interface as the default TorchScript traces (torch.compile's
    inductor too, but its compile takes tens of seconds here: benchmarks/decode_backends.py measures it)."""
    model = sat(2)
    feats, masks = data
    opts = DecodeOptions(beam_size=2)
    expected = decode(model, feats, masks, opts)
    for backend in ("torchscript", "export"):
        decoder = Decoder(model, compile=backend)
        result = decode(decoder, feats, masks, opts)
        assert torch.equal(result.seq, expected.seq), backend
        torch.testing.assert_close(result.logprobs, expected.logprobs, atol=1e-5, rtol=0)
        assert decoder.recordings() == (0, 2)  # the first step (one row per image) and the rest
    message = "compile='jit': choose True, False or one of ['eager', 'native', 'torchscript', 'inductor', 'export']"
    with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
        Decoder(model, compile="jit")


def test_recording_a_step_shows_the_host_no_tracer_warnings(sat, data):
    """TorchScript's tracer warns (deprecation, traced conditionals) on every recording; the host sees none of it,
    even with every warning shown."""
    feats, masks = data
    decoder = Decoder(sat(2), compile="torchscript")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        decode(decoder, feats[:1], masks[:1], DecodeOptions(max_length=4))
    assert decoder.recordings() == (0, 1) and [str(w.message) for w in shown] == []


def test_recorded_steps_pad_the_regions_to_a_multiple_of_16(sat):
    """Images of 1 to 16 regions share one recorded step (their keys/values padded to 16 regions, the padding
    masked out); 17 regions take a second one, padded to 32."""
    model = sat(2)
    decoder = Decoder(model, compile="torchscript")
    assert decoder.records_shapes
    g = torch.Generator().manual_seed(0)
    for regions, padded, recorded in [(1, 16, 1), (16, 16, 1), (17, 32, 2)]:
        feats = torch.randn(1, regions, model.config.att_feat_size, generator=g)
        state = decoder.prefill(feats, None, max_length=4)
        head = model.config.d_model // model.config.num_heads
        assert [tuple(t.shape) for kv in state.memory_kv for t in kv] == \
            [(1, model.config.num_heads, padded, head)] * 2 * model.config.num_layers
        assert torch.equal(state.memory_bias.view(-1) == NEG_INF, torch.arange(padded) >= regions)
        result = decode(decoder, feats, None, DecodeOptions(max_length=4))
        assert torch.equal(result.seq, decode(model, feats, None, DecodeOptions(max_length=4)).seq)
        assert decoder.recordings() == (0, recorded)


def test_per_position_rules_of_beam_search():
    logprobs = torch.zeros(1, 2, 5)  # (B, W, V+1)
    assert torch.equal(suppress_unk(logprobs)[..., -1], torch.full((1, 2), -1000.0))
    assert torch.equal(suppress_unk(logprobs)[..., :-1], logprobs[..., :-1])
    penalised = diversity_penalty(logprobs, torch.tensor([[1, 1, 3]]), 0.5)
    assert torch.equal(penalised[0, 0], torch.tensor([0.0, -1.0, 0.0, -0.5, 0.0]))
    assert torch.equal(forbid_repeat(torch.zeros(2, 4), torch.tensor([[2], [0]])).isinf(),
                       torch.tensor([[False, False, True, False], [True, False, False, False]]))
    # ties: candidate c of every beam before candidate c + 1 of any (the reference's stable sort)
    sums, scores = torch.tensor([[0.0, 0.0]]), torch.tensor([[[0.0, -1.0, -5.0], [0.0, -1.0, -5.0]]])
    new_sum, parent, word, chosen = select_beams(sums, scores, 3)
    assert parent.tolist() == [[0, 1, 0]] and word.tolist() == [[0, 0, 1]] and new_sum.tolist() == [[0.0, 0.0, -1.0]]
    assert torch.equal(chosen, new_sum)


def test_select_beams_keeps_the_references_order_of_ties_for_wide_beams():
    """Five beams with equal sums and equal log-probs: 25 tied candidates (more than a small sort keeps in order by
    itself) ranked candidate-major, the best word of every beam first, then the second best of each."""
    logprobs = torch.tensor([0.0, -1.0, -2.0, -3.0, -4.0, -5.0]).expand(1, 5, 6)
    new_sum, parent, word, _ = select_beams(torch.zeros(1, 5), logprobs, 5)
    assert parent.tolist() == [[0, 1, 2, 3, 4]] and word.tolist() == [[0] * 5] and new_sum.tolist() == [[0.0] * 5]
    # the last beam's best word ties with the others' second best: candidate 0 of any beam comes first
    new_sum, parent, word, _ = select_beams(torch.tensor([[0.0, 0.0, 0.0, 0.0, -1.0]]), logprobs, 5)
    assert parent.tolist() == [[0, 1, 2, 3, 4]] and word.tolist() == [[0] * 5] and new_sum[0, 4] == -1.0


@pytest.mark.parametrize("caption, kept", [
    ("a man riding a horse on a", "a man riding a horse"), ("a dog with the", "a dog"), ("a dog", "a dog"),
    ("the a", "the a"), ("", ""), ("people in his", "people"), ("an old bench", "an old bench"),
    ("a dog on The", "a dog on The"), ("a dog  a", "a dog "), ("a dog a ", "a dog a ")])
def test_remove_bad_endings_trims_as_the_reference(caption, kept):
    """The reference's decode_sequence with remove_bad_endings: trailing words of its list go, unless every
    word is one of them; words are split at single spaces and compared case-sensitively, as there."""
    assert without_bad_endings(caption) == kept



class PrefixStepper:
    """K=1 steps whose log-probs depend on each row's words so far (a table, else `default`), rows following
    beam_search's reorders: a model small enough to work beam search out by hand."""

    group_size = 1

    def __init__(self, rows: int, table: dict, default: dict, outputs: int) -> None:
        self.prefixes = [() for _ in range(rows)]
        self.table, self.default, self.outputs, self.started = table, default, outputs, False

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.started:  # the first call feeds the start token, which is no word of the prefix
            self.prefixes = [p + (int(t),) for p, t in zip(self.prefixes, tokens[:, 0])]
        self.started = True
        out = torch.full((len(self.prefixes), 1, self.outputs), -9.0)
        for r, prefix in enumerate(self.prefixes):
            for word, lp in self.table.get(prefix, self.default).items():
                out[r, 0, word] = lp
        return out

    def reorder(self, index: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[i] for i in index.tolist()]


def test_length_penalty_beam_search_runs_every_position():
    """With a length penalty a beam whose summed log-prob is below every finished beam's can still finish
    above them (avg: -2.21 / 4 > -2.1 / 3), so beam search may not stop early once the finished beams beat
    every running sum, as it does without one (the reference always runs to max_length). Worked by hand:
    pos 1 finishes [1, 0] (-1.5 / 2), pos 2 [1, 1, 0] (-2.1 / 3) with [1, 1, 1] running at -2.2, pos 3
    finishes [1, 1, 1, 0] at -2.21 / 4."""
    table = {(): {1: -1.0, 2: -1.2, 0: -5.0}, (1,): {0: -0.5, 1: -0.6, 2: -4.0}, (2,): {0: -2.0, 1: -2.0, 2: -2.0},
             (1, 1): {0: -0.5, 1: -0.6, 2: -4.0}, (1, 1, 1): {0: -0.01, 1: -4.0, 2: -4.0}}
    default = {0: -5.0, 1: -5.0, 2: -5.0}
    opts = DecodeOptions(beam_size=2, n_best=2, max_length=6, suppress_unk=False, length_penalty="avg_1")
    result = beam_search(PrefixStepper(2, table, default, 4), 1, opts)
    assert result.seq.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert result.scores.tolist() == pytest.approx([(-1.0 - 0.6 - 0.6 - 0.01) / 4, (-1.0 - 0.6 - 0.5) / 3], abs=1e-6)
    torch.testing.assert_close(result.logprobs[0], torch.tensor([-1.0, -0.6, -0.6, -0.01, 0.0, 0.0]))
    # the summed log-prob alone ranks the short captions first, and then search may stop as soon as it is settled
    plain = beam_search(PrefixStepper(2, table, default, 4), 1, dataclasses.replace(opts, length_penalty=""))
    assert plain.seq.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert plain.scores.tolist() == pytest.approx([-1.5, -2.1], abs=1e-6)


def test_draw_at_the_ends_of_the_unit_interval_never_picks_a_zero_weight(monkeypatch):
    """u = 0 (torch.rand can return exactly 0) and u just below the total still land on positive weights."""
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0]])
    for value, expected in ((0.0, [1, 2]), (1.0, [3, 2])):
        monkeypatch.setattr(torch, "rand",
                            lambda shape, value=value, generator=None, **kw: torch.full(shape, value, **kw))
        assert draw(weights).tolist() == expected, value


def test_top_p_of_one_keeps_words_below_float32_resolution(monkeypatch):
    """top_p = 1 keeps every word: one of probability 2e-9, after which the nucleus' cumulative sum is already 1.0 in
    float32, is still drawn where it comes first and u = 0; a nucleus below 1 drops it."""
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, **kw: torch.zeros(shape, **kw))
    logprobs = torch.tensor([[-20.0, 0.0, -30.0]])
    assert choose(logprobs, DecodeOptions(sample_method="sample"), None).tolist() == [0]
    assert choose(logprobs, DecodeOptions(sample_method="sample", top_p=0.999), None).tolist() == [1]


def test_the_nucleus_ends_with_the_word_whose_mass_reaches_top_p(monkeypatch):
    """Probabilities 1/2, 1/4, 1/4 (exact in float32): top_p = 1/2 keeps the first word alone, 3/4 the first two; a
    draw at the top of the unit interval takes the last word kept."""
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, **kw: torch.ones(shape, **kw))
    logprobs = torch.tensor([[0.5, 0.25, 0.25]]).log()
    for top_p, word in ((0.5, 0), (0.75, 1), (0.7500001, 2), (1.0, 2)):
        assert choose(logprobs, DecodeOptions(sample_method="sample", top_p=top_p), None).tolist() == [word], top_p


def test_temperature_scales_the_log_probs_before_a_draw(monkeypatch):
    """Probabilities 3/4 and 1/4: a draw at u = 0.7 takes the first word at temperature 1 (its share 0.75) and the
    second at temperature 2, where the shares flatten to 0.63 and 0.37, and at 4."""
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, **kw: torch.full(shape, 0.7, **kw))
    logprobs = torch.tensor([[0.75, 0.25]]).log()
    for temperature, word in ((0.5, 0), (1.0, 0), (2.0, 1), (4.0, 1)):
        options = DecodeOptions(sample_method="sample", temperature=temperature)
        assert choose(logprobs, options, None).tolist() == [word], temperature


@pytest.mark.parametrize("name", ["beam_size", "sample_n", "max_length", "beam_groups", "n_best"])
@pytest.mark.parametrize("bad", [0, -1, True, 1.0])
def test_counts_must_be_positive_integers(name, bad):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got {bad!r}"):
        DecodeOptions(**{name: bad})


@pytest.mark.parametrize("options, message", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(beam_size=2, sample_method="sample"), r"beam search \(beam_size > 1\) needs sample_method='greedy'"),
    (dict(beam_size=2, sample_n=2), "use n_best, not sample_n, to get several captions from beam search"),
])
def test_option_values_and_combinations_that_cannot_decode(options, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**options)


@pytest.mark.parametrize("temperature", [0.0, -0.0, -1.0, float("-inf")])
def test_a_temperature_that_is_not_positive_is_refused_as_such(temperature):
    with pytest.raises(ValueError, match=f"^temperature must be positive, got {temperature}$"):
        DecodeOptions(sample_method="sample", temperature=temperature)


def test_rows_per_image_and_decoder_rows():
    assert (DecodeOptions(beam_size=4, n_best=2).rows_per_image,
            DecodeOptions(beam_size=4, n_best=2).decoder_rows) == (2, 4)
    assert (DecodeOptions(sample_n=3).rows_per_image, DecodeOptions(sample_n=3).decoder_rows) == (3, 3)
    assert (DecodeOptions().rows_per_image, DecodeOptions().decoder_rows) == (1, 1)
    assert (DecodeOptions(beam_size=2, n_best=2).rows_per_image, DecodeOptions(beam_size=2).decoder_rows) == (2, 2)


def test_decode_options_default_to_the_references_eval_options():
    """`satic caption` leaves the options its flags do not set to these (its help states them): the reference's
    eval.py defaults, UNK suppressed in beam search and the caption text kept whole."""
    assert dataclasses.asdict(DecodeOptions()) == {
        "sample_method": "greedy", "beam_size": 1, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "sample_n": 1,
        "max_length": 20, "length_penalty": "", "decoding_constraint": False, "block_trigrams": False,
        "beam_groups": 1, "diversity_lambda": 0.5, "n_best": 1, "suppress_unk": True, "remove_bad_endings": False}


def test_decode_options_cannot_change_after_their_checks():
    options = DecodeOptions(beam_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beam_size = 0
    assert hash(options) == hash(DecodeOptions(beam_size=2))


def test_length_penalty_parts_are_its_kind_and_exponent():
    assert DecodeOptions().length_penalty_parts == ("", 0.0)
    assert DecodeOptions(beam_size=2, length_penalty="wu_0.9").length_penalty_parts == ("wu", 0.9)
    assert DecodeOptions(beam_size=2, length_penalty="avg_-2").length_penalty_parts == ("avg", -2.0)


def test_the_diversity_lambda_bound_is_inclusive():
    from satic.decoding.options import MAX_DIVERSITY_LAMBDA

    for value in (MAX_DIVERSITY_LAMBDA, -MAX_DIVERSITY_LAMBDA):
        DecodeOptions(beam_size=2, beam_groups=2, diversity_lambda=value)
    for value in (math.nextafter(1e6, math.inf), math.nextafter(-1e6, -math.inf)):
        with pytest.raises(ValueError, match=r"diversity_lambda must be a number from -1e\+06 to 1e\+06"):
            DecodeOptions(beam_size=2, beam_groups=2, diversity_lambda=value)


def test_bad_endings_are_the_references_list():
    from satic.decoding.options import BAD_ENDINGS

    # misc/utils.py: ['with', 'in', 'on', 'of', 'a', 'at', 'to', 'for', 'an', 'this', 'his', 'her', 'that'] + ['the']
    assert BAD_ENDINGS == {"with", "in", "on", "of", "a", "at", "to", "for", "an", "this", "his", "her", "that", "the"}
    assert without_bad_endings("a man that") == "a man"


def test_ensemble_members_must_agree_and_weights_match_them(sat):
    from satic.model import SATModel

    model = sat(2)
    other = SATModel(dataclasses.replace(model.config, att_feat_size=model.config.att_feat_size + 1)).eval()
    with pytest.raises(SaticError, match=r"ensemble model 1 has K=2, 30 words, features 33; model 0 has K=2, 30 "
                                         r"words, features 32"):
        Ensemble([model, other])
    for weights in ([1.0], [1.0, 1.0, 1.0], [1.0, math.inf], [0.0, 1.0], [-1.0, 1.0], [math.nan, 1.0]):
        with pytest.raises(SaticError,
                           match=re.escape(f"ensemble weights {weights} must be 2 positive finite numbers")):
            Ensemble([model, sat(2)], weights=weights)
    with pytest.raises(SaticError, match=re.escape("ensemble weights ['a', 1.0] must be 2 positive finite numbers, "
                                                   "one per checkpoint")):
        Ensemble([model, sat(2)], weights=["a", 1.0])
    with pytest.raises(SaticError, match="^an ensemble needs at least one model$"):
        Ensemble([])
    assert Ensemble([model, sat(2)]).weights == [1.0, 1.0]


def test_a_native_ensemble_step_weights_its_members(sat, data):
    """Members prepared for the native step mix natively, with their weights (as the eager mix)."""
    from satic.decoding.ensemble import EnsembleStepper

    feats, masks = data
    decoders = [Decoder.prepare(m, "fp32", "cpu", compile=True) for m in (sat(1, seed=0), sat(1, seed=1))]
    ensemble = EnsembleStepper([d.prefill(feats, masks, 1, 4) for d in decoders], [3.0, 1.0])
    assert ensemble.native
    alone = [d.prefill(feats, masks, 1, 4) for d in decoders]
    tokens = torch.zeros(6, 1, dtype=torch.long)
    with torch.no_grad():
        expected = (0.75 * alone[0].step(tokens).exp() + 0.25 * alone[1].step(tokens).exp()).log()
        torch.testing.assert_close(ensemble.step(tokens), expected, atol=1e-5, rtol=0)


def test_option_bounds_are_inclusive_and_n_best_needs_a_beam():
    for edge in (dict(beam_size=2, beam_groups=2, diversity_lambda=1e6), dict(diversity_lambda=-1e6),
                 dict(beam_size=2, length_penalty="wu_50"), dict(beam_size=2, length_penalty="avg_-50")):
        DecodeOptions(**edge)
    with pytest.raises(ValueError, match=r"n_best \(2\) cannot exceed beam_size \(1\)"):
        DecodeOptions(n_best=2)


def test_a_decode_result_moves_with_its_draws():
    seq, logprobs, scores = torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, dtype=torch.float64)
    draws, draw_logprobs = torch.full((2, 3), 4), torch.full((2, 3), -0.5)
    moved = DecodeResult(seq, logprobs, scores, draws, draw_logprobs).to("cpu")
    assert moved.draws.tolist() == draws.tolist() and moved.draw_logprobs.tolist() == draw_logprobs.tolist()
    assert DecodeResult(seq, logprobs, scores).to("cpu").draws is None


def test_a_model_in_train_mode_decodes_eagerly_even_when_compiled(sat, data):
    """Dropout during decoding: nothing is recorded (a recording would fix one dropout mask), and the model
    stays in train mode."""
    model = sat(2).train()
    feats, masks = data
    decoder = Decoder(model, compile="torchscript")
    result = decode(decoder, feats[:2], masks[:2], DecodeOptions(max_length=6))
    assert result.seq.shape == (2, 6) and model.training
    assert decoder.recordings() == (0, 0) and not decoder.records_shapes


def test_prefill_defaults_to_one_row_per_image_and_the_references_20_words(sat, data):
    feats, masks = data
    model = sat(2)
    state = Decoder(model).prefill(feats, masks)
    c = model.config
    assert state.decoder_rows == 1
    assert [tuple(kv.shape) for kv in state.cache.kv] == \
        [(2, feats.size(0), c.num_heads, 20, c.d_model // c.num_heads)] * c.num_layers


def test_prefill_takes_a_max_length_that_fills_the_position_table_and_no_more():
    """max_positions 12 at K=2 holds max_length 12 (six groups); 13 needs 14 positions and is refused."""
    from satic.model import ModelConfig, SATModel

    config = ModelConfig(vocab_size=3, group_size=2, num_layers=1, d_model=16, d_ff=32, num_heads=2,
                         att_feat_size=8, max_positions=12)
    decoder = Decoder(SATModel(config).eval())
    feats, masks = torch.ones(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    assert decoder.prefill(feats, masks, 1, 12).cache.kv[0].size(3) == 12
    message = "max_length 13 needs 14 positions but the model has max_positions=12; use a max_length of at most 12"
    with pytest.raises(SaticError, match=f"^{re.escape(message)}$"):
        decoder.prefill(feats, masks, 1, 13)


def test_select_beams_ranks_equal_log_probs_by_word_index():
    """Words of equal log-prob enter the beams in the order of their index, as a stable sort and the native beam
    search rank them (topk returns equal values in an unspecified order: here 5, 4, 1; the reference's torch.sort,
    not stable, has its own order among exact ties: ARCHITECTURE.md)."""
    logprobs = torch.tensor([[[-2.0, -1.0, -1.0, -1.5, -1.0, -1.0, -1.0]]])
    _, parent, word, chosen = select_beams(torch.zeros(1, 1), logprobs, 3)
    assert word.tolist() == [[1, 2, 4]] and parent.tolist() == [[0, 0, 0]] and chosen.tolist() == [[-1.0] * 3]


def test_stable_topk_takes_what_a_stable_descending_sort_puts_first():
    from satic.decoding.search import stable_topk

    g = torch.Generator().manual_seed(0)
    for trial in range(300):  # few distinct values: many ties, -inf among them, and -0.0 beside 0.0
        vocab, k = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        x = torch.randint(-3, 3, (2, 3, vocab), generator=g).float() * torch.rand(1, generator=g)
        x[x < -2] = float("-inf")
        x[..., 0] = -0.0 if trial % 2 else x[..., 0]
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            values, index = stable_topk(x.to(dtype), k)
            expected = x.to(dtype).sort(dim=-1, descending=True, stable=True)
            assert torch.equal(index, expected.indices[..., :k]) and torch.equal(values, expected.values[..., :k])


def test_stable_topk_without_ties_works_on_the_floats():
    """Log-probs over COCO's vocabulary rarely hold two equal values at the k-th place: the beams are then chosen by
    a float topk, with no int64 key made per word (8 bytes for each of beams x 9,488 outputs, at every position)."""
    from torch.overrides import TorchFunctionMode

    from satic.decoding.search import stable_topk

    class LargestInt64(TorchFunctionMode):
        largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                    self.largest = max(self.largest, t.numel())
            return out

    x = torch.randn(4, 5, 9488, generator=torch.Generator().manual_seed(0)).log_softmax(-1)  # (B, W, V+1)
    with LargestInt64() as mode:
        values, index = stable_topk(x, 5)
    expected = x.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(index, expected.indices[..., :5]) and torch.equal(values, expected.values[..., :5])
    assert mode.largest <= 4 * 5 * 6  # the indices of k + 1 words per row, not a key per word


def test_stable_topk_orders_ties_by_index_for_wide_beams_and_close_values():
    """Ties inside the k largest (k = 20 beams: more entries than a small sort keeps in order by itself) come in the
    order of their index; values closer together than 1.0's float32 resolution keep their order."""
    from satic.decoding.search import stable_topk

    wide = torch.zeros(2, 30)
    wide[:, ::3] = -1.0  # 20 equal values at the top, then 10 lower: no tie at the k-th place
    tiny = torch.tensor([[-3e-20, -1e-20, -2e-20, -1e-20, -4e-20]])  # a tie at the first place
    for x, k in ((wide, 20), (tiny, 1), (tiny, 2), (tiny, 4)):
        expected = x.sort(dim=-1, descending=True, stable=True)
        values, index = stable_topk(x, k)
        assert torch.equal(index, expected.indices[..., :k]) and torch.equal(values, expected.values[..., :k]), k


def test_a_draw_without_any_weight_is_word_0():
    """A row where every word is -inf (an ensemble's mixture underflows, and decoding_constraint forbids the one word
    left) has no weight to draw from: it takes word 0, its argmax, as greedy decoding does, not the out-of-range V."""
    assert draw(torch.zeros(2, 5)).tolist() == [0, 0]
    opts = DecodeOptions(sample_method="sample", temperature=0.5, top_p=0.9)
    logprobs = torch.tensor([[float("-inf")] * 4, [-3.0, -0.1, float("-inf"), -2.0]])
    words = choose(logprobs, opts, torch.Generator().manual_seed(0))
    assert words[0] == 0 and words[1] in (0, 1, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_a_negative_diversity_lambda_does_not_stop_early(seed, tiny_model):
    """A negative diversity_lambda rewards a later group for the words of earlier groups, so its sums can rise
    past finished beams: the search must run every position, and an image's captions do not depend on the images
    decoded beside it (the early stop once `settled` made them depend on whether the batch ran on)."""
    model = tiny_model(2, eos_bias=2.0, seed=seed)  # captions that end early: a search that may settle
    feats = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(seed))
    opts = DecodeOptions(beam_size=4, beam_groups=2, diversity_lambda=-2.0, max_length=12, n_best=4)
    both = decode(model, feats, None, opts)
    for i in range(3):
        one = decode(model, feats[i:i + 1], None, opts)
        assert torch.equal(one.seq, both.seq[4 * i:4 * i + 4]), i
        torch.testing.assert_close(one.scores, both.scores[4 * i:4 * i + 4], atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_draw_logprobs_are_zero_after_the_step_where_every_row_finished(k, tiny_model):
    """Sampling stops once every row has finished; the parallel pass over the draws gives the sampler's log-probs,
    and 0 at the positions of the steps that never ran (not the log-prob of word 0 there)."""
    from satic.decoding import draw_logprobs

    model = tiny_model(k, eos_bias=3.0)
    feats = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    opts = DecodeOptions(sample_method="sample", sample_n=3, max_length=16)
    result = decode(model, feats, None, opts, generator=torch.Generator().manual_seed(1))
    ran = int((result.draws != 0).any(0).nonzero().max()) + 1
    assert ran <= 16 - 2 * k  # the sampler stopped early: later positions were never drawn
    parallel = draw_logprobs(model, feats, None, result.draws)
    torch.testing.assert_close(parallel, result.draw_logprobs, atol=1e-5, rtol=0)
    assert not bool(parallel[:, -k:].any())


def test_a_finished_beam_scoring_minus_infinity_still_fills_an_empty_slot():
    """The reference keeps every finished beam, whatever its score: one of -inf (all its words forbidden) is
    returned before an empty row."""
    from satic.decoding.search import FinishedBeams

    finished = FinishedBeams(1, 1, 2, 3, "cpu")
    seq = torch.tensor([[[4, 0, 0], [5, 6, 0]]])
    score = torch.tensor([[float("-inf"), -1.0]], dtype=torch.float64)
    finished.add(0, seq, torch.zeros(1, 2, 3), score, torch.tensor([[True, False]]))
    result = finished.result(2)
    assert result.seq.tolist() == [[4, 0, 0], [0, 0, 0]]
    assert result.scores[0] < -1e300 and result.scores[1] == float("-inf")


def test_beam_search_settles_only_when_no_running_beam_or_restart_can_beat_the_kept_ones():
    """A finished beam's running score restarts from -1000 and can still grow a better caption: kept scores below
    -1000 never settle the search, even when every running sum is lower still."""
    from satic.decoding.search import FinishedBeams

    finished = FinishedBeams(1, 1, 1, 3, "cpu")
    finished.add(0, torch.tensor([[[4, 0, 0]]]), torch.zeros(1, 1, 3), torch.tensor([[-1200.0]], dtype=torch.float64),
                 torch.tensor([[True]]))
    assert not finished.settled(torch.tensor([[[-1500.0]]]))
    assert not finished.settled(torch.tensor([[[-1100.0]]]))
    finished.score[:] = -900.0
    assert finished.settled(torch.tensor([[[-1500.0]]]))
    assert not finished.settled(torch.tensor([[[-800.0]]]))


def test_checkpoint_decoding_defaults_hold_only_the_options_that_are_set():
    from satic.decoding.options import checkpoint_defaults

    assert checkpoint_defaults(16) == checkpoint_defaults(16, "", False) == {"max_length": 16}
    assert checkpoint_defaults(12, "wu_0.9") == {"max_length": 12, "length_penalty": "wu_0.9"}
    assert checkpoint_defaults(12, remove_bad_endings=True) == {"max_length": 12, "remove_bad_endings": True}


def test_finished_beams_of_equal_score_keep_the_order_in_which_they_finished():
    """The reference sorts its finished beams with Python's stable sort: of equal scores, the beams kept earlier
    stay before later ones, and within one position the lower beam first."""
    from satic.decoding.search import FinishedBeams

    width = 32
    finished = FinishedBeams(1, 1, width, 2, "cpu")
    for first in (1, 2, 3):
        seq = torch.stack([torch.arange(width) * 10 + first, torch.zeros(width, dtype=torch.long)], 1)[None]
        score = torch.full((1, width), -1.0, dtype=torch.float64)
        finished.add(0, seq, torch.zeros(1, width, 2), score, torch.ones(1, width, dtype=torch.bool))
    assert finished.seq[0, 0, :, 0].tolist() == list(range(1, 10 * width, 10))
