"""The native decoding of csrc/decoder.cpp, the CPU default of a compiled Decoder: the step (the model's
decode + logprobs over the static cache in one call), and the sampling (greedy or drawn) and beam search
loops in one call."""
import copy
import dataclasses

import pytest
import torch

from satic.decoding import DecodeOptions, Decoder, Ensemble, decode
from satic.decoding.search import beam_search, native_members, sample, staggered_beam_search, start
from satic.decoding.engine import (native_beam_search, native_decoder_weights, native_encoder_weights,
                                  native_sample)
from satic.model import SATModel
from satic.decoding.small_gemm import build_problem
from satic.evaluation.timing import torch_threads

needs_kernel = pytest.mark.skipif(build_problem() is not None,
                                  reason=f"small-row kernel unavailable: {build_problem()}")


def run_steps(decoder: Decoder, feats, masks, rows: int, steps: int, seed: int):
    """Log-probs of `steps` steps of random words (the same for every decoder given the seed), and the cache."""
    g = torch.Generator().manual_seed(seed)
    k = decoder.group_size
    state = decoder.prefill(feats, masks, decoder_rows=rows, max_length=steps * k)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.randint(0, decoder.config.num_outputs, (feats.size(0) * rows, k), generator=g)
            out.append(decoder.step(state, tokens))
    return torch.stack(out), state.cache


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("rows", [1, 3])
def test_native_step_equals_the_traced_step(k, rows, sat, data):
    feats, masks = data  # several images with different region counts: R = B * rows, image-major
    model = sat(k, seed=k)
    native = Decoder.prepare(model, compile=True)
    traced = Decoder.prepare(model, compile="torchscript")
    assert native.backend == "native" and native_decoder_weights(native.model) is not None
    got, cache = run_steps(native, feats, masks, rows, 4, seed=k)
    expected, expected_cache = run_steps(traced, feats, masks, rows, 4, seed=k)
    assert got.shape == (4, feats.size(0) * rows, k, model.config.num_outputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert cache.length == expected_cache.length == 4 * k
    for kv, kv_ref in zip(cache.kv, expected_cache.kv):  # the same keys/values written at the same slots
        torch.testing.assert_close(kv, kv_ref, atol=1e-5, rtol=0)
    assert native.recordings() == (0, 0)  # nothing recorded: the native step takes any shape


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(beam_size=3), DecodeOptions(beam_size=2, n_best=2),
                                  DecodeOptions(decoding_constraint=True, block_trigrams=True)],
                         ids=["greedy", "beam3", "nbest", "constrained"])
def test_captions_with_the_native_step_equal_eager_decoding(k, opts, sat, data):
    """Batched, and one image at a time as the latency path decodes (the native prefill, cropped to the
    image's padded regions, then the native step and loops)."""
    feats, masks = data
    model = sat(k, seed=10 + k)
    eager, native = Decoder(model), Decoder.prepare(model, compile=True)  # eager: the model's own layers
    expected = decode(eager, feats, masks, opts)
    got = decode(native, feats, masks, opts)
    assert torch.equal(got.seq, expected.seq)
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-4, rtol=0)
    for image in range(feats.size(0)):
        one, one_mask = feats[image:image + 1], masks[image:image + 1]
        expected, got = decode(eager, one, one_mask, opts), decode(native, one, one_mask, opts)
        assert torch.equal(got.seq, expected.seq)
        torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)


@needs_kernel
def test_native_step_does_not_depend_on_threads_or_batching(sat, data):
    feats, masks = data
    decoder = Decoder.prepare(sat(2), compile=True)
    with torch_threads(1):
        single, _ = run_steps(decoder, feats, masks, 3, 3, seed=5)
    with torch_threads(2):
        double, _ = run_steps(decoder, feats, masks, 3, 3, seed=5)
    assert torch.equal(single, double)
    alone = decode(decoder, feats[1:2], masks[1:2], DecodeOptions())
    batched = decode(decoder, feats, masks, DecodeOptions())
    assert torch.equal(alone.seq[0], batched.seq[1])


@needs_kernel
@pytest.mark.parametrize("beam", [1, 3])
def test_many_rows_run_natively(beam, sat, data):
    """Hundreds of word rows per step (K=4, many images) take the native step and loops like a few: nothing
    is recorded, and the captions are eager decoding's."""
    feats, masks = data
    decoder = Decoder.prepare(sat(4), compile=True)
    images = 256 // 4 // beam // feats.size(0) + 1
    many, many_masks = feats.repeat(images, 1, 1), masks.repeat(images, 1)
    opts = DecodeOptions(max_length=8, beam_size=beam)
    assert many.size(0) * beam * 4 > 256
    with torch.no_grad():
        state = decoder.prefill(many, many_masks, opts.decoder_rows, opts.max_length)
        loop = decoder.beam_search(state, many.size(0), opts) if beam > 1 else decoder.sample(state, opts)
    assert loop is not None
    result = decode(decoder, many, many_masks, opts)
    assert decoder.recordings() == (0, 0)
    expected = decode(Decoder(sat(4)), many, many_masks, opts)
    assert torch.equal(result.seq, expected.seq)


@pytest.mark.parametrize("weights", [native_encoder_weights, native_decoder_weights], ids=["prefill", "step"])
def test_native_calls_are_not_used_where_their_kernels_are_not(weights, sat):
    assert weights(Decoder.prepare(sat(1), kernel="torch").model) is None
    assert weights(Decoder.prepare(sat(1), "bf16").model) is None
    if build_problem() is None:
        assert weights(Decoder.prepare(sat(1), "int8").model) is not None  # int8 weights are the kernel's too
        assert weights(Decoder.prepare(sat(1)).model.train()) is None


@needs_kernel
def test_native_calls_need_every_layer_the_kernels_on_the_cpu_in_float32_with_one_norm_eps(sat):
    """A prepared model reads natively until one of the layers it reads is torch's, one norm's eps differs from
    the others (the native calls take one eps), or its numbers leave float32 or the CPU (here to the meta
    device, which needs no GPU)."""
    prepared = Decoder.prepare(sat(1)).model
    assert native_decoder_weights(prepared) is not None and native_encoder_weights(prepared) is not None
    torch_generator = copy.deepcopy(prepared)
    torch_generator.generator = torch.nn.Linear(prepared.config.d_model, prepared.config.num_outputs)
    assert native_decoder_weights(torch_generator) is None
    assert native_encoder_weights(torch_generator) is not None  # the encoder's call does not read the generator
    other_eps = copy.deepcopy(prepared)
    other_eps.decoder_layers[0].norm2.eps = 1e-3
    assert native_decoder_weights(other_eps) is None
    assert native_decoder_weights(copy.deepcopy(prepared).to(torch.bfloat16)) is None
    assert native_encoder_weights(copy.deepcopy(prepared).to("meta")) is None


@needs_kernel
def test_only_decoders_without_the_native_step_record_each_shape(sat):
    """records_shapes: fp32 and int8 kernel layers step natively at any shape; bf16, torch's layers and an
    explicit TorchScript backend record a trace per shape; eager decoding records nothing."""
    model = sat(1)
    assert not Decoder.prepare(model, compile=True).records_shapes
    assert not Decoder.prepare(model, "int8", compile=True).records_shapes
    assert Decoder.prepare(model, "bf16", compile=True).records_shapes
    assert Decoder.prepare(model, kernel="torch", compile=True).records_shapes
    assert Decoder.prepare(model, compile="torchscript").records_shapes
    for eager in (Decoder.prepare(model), Decoder(model)):  # compile=False unless asked for
        assert eager.backend == "eager" and not eager.records_shapes


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
def test_native_int8_decoding_equals_the_traced_int8_step(k, sat, data):
    """int8 weights through the same kernel: the native step, greedy loop and beam search against the traced
    int8 step (the integer products are exact, so only the float parts round differently)."""
    feats, masks = data
    model = sat(k, seed=30 + k)
    native = Decoder.prepare(model, "int8", compile=True)
    traced = Decoder.prepare(model, "int8", compile="torchscript")
    got, _ = run_steps(native, feats, masks, 2, 3, seed=k)
    expected, _ = run_steps(traced, feats, masks, 2, 3, seed=k)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for opts in (DecodeOptions(), DecodeOptions(beam_size=3)):
        result, reference = decode(native, feats[:3], masks[:3], opts), decode(traced, feats[:3], masks[:3], opts)
        assert torch.equal(result.seq, reference.seq)
        torch.testing.assert_close(result.logprobs, reference.logprobs, atol=1e-5, rtol=0)
    assert native.recordings() == (0, 0)


@needs_kernel
def test_native_step_rejects_bad_arguments(sat, data):
    feats, masks = data
    decoder = Decoder.prepare(sat(2), compile=True)
    state = decoder.prefill(feats, masks, decoder_rows=1, max_length=4)
    weights = native_decoder_weights(decoder.model)
    memory = [t for kv in state.memory_kv for t in kv]
    heads, d_ff, eps = decoder.config.num_heads, decoder.config.d_ff, decoder.model.decoder_norm.eps
    op = torch.ops.satic_small_gemm.decode_step
    tokens = torch.zeros(feats.size(0), 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        op(tokens + decoder.config.num_outputs, 0, state.cache.kv, memory, state.memory_bias, weights, heads, d_ff, eps)
    with pytest.raises(RuntimeError, match="do not fit a cache"):
        op(tokens, 4, state.cache.kv, memory, state.memory_bias, weights, heads, d_ff, eps)
    with pytest.raises(RuntimeError, match="weight tensors"):
        op(tokens, 0, state.cache.kv, memory, state.memory_bias, weights[:-1], heads, d_ff, eps)
    with pytest.raises(RuntimeError, match="rows do not split"):
        op(tokens[:-1], 0, [c[:, :-1] for c in state.cache.kv], memory, state.memory_bias, weights, heads, d_ff, eps)


class PythonLoop:
    """A DecodeState seen only through the Stepper protocol: search.sample then runs its Python loop."""

    def __init__(self, state) -> None:
        self.state, self.group_size = state, state.group_size
        self.steps = 0

    def step(self, tokens):
        self.steps += 1
        return self.state.step(tokens)

    def reorder(self, index):
        self.state.reorder(index)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("max_length", [4, 9, 20])
@pytest.mark.parametrize("early_end", [True, False])
def test_native_greedy_loop_equals_the_python_loop(k, max_length, early_end, sat, data):
    """One native call for the whole greedy loop gives exactly what sample()'s Python loop gives over the
    same native steps: output, draws, log-probs, scores, and the steps it ran."""
    feats, masks = data
    model = sat(k) if early_end else sat(k, seed=20 + k)  # the fixture's weights end captions at varied lengths
    if not early_end:
        with torch.no_grad():
            model.generator.bias[0] = -1e4  # EOS never chosen: every row runs max_length // k steps
    decoder = Decoder.prepare(model, compile=True)
    opts = DecodeOptions(max_length=max_length)
    rows = feats.size(0)
    native_state = decoder.prefill(feats, masks, 1, max_length)
    with torch.no_grad():
        assert decoder.sample(native_state, opts) is not None and native_state.cache.length > 0
        got = sample(decoder.prefill(feats, masks, 1, max_length), rows, opts)
        loop = PythonLoop(decoder.prefill(feats, masks, 1, max_length))
        expected = sample(loop, rows, opts)
    for name in ("seq", "logprobs", "scores", "draws", "draw_logprobs"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert native_state.cache.length == loop.steps * k
    if not early_end:
        assert loop.steps == max_length // k and bool((got.seq[:, : loop.steps * k] > 0).all())
    elif max_length == 20:  # an image whose caption ends, alone: both loops stop at its finishing step
        i = int((got.seq == 0).any(1).nonzero()[0, 0])
        one, alone = PythonLoop(decoder.prefill(feats[i:i + 1], masks[i:i + 1], 1, 20)), decoder.prefill(
            feats[i:i + 1], masks[i:i + 1], 1, 20)
        with torch.no_grad():
            assert torch.equal(sample(one, 1, opts).seq[0], got.seq[i]) and torch.equal(
                sample(alone, 1, opts).seq[0], got.seq[i])
        assert one.steps < 20 // k and alone.cache.length == one.steps * k


SAMPLING = {"sample": dict(sample_method="sample"),
            "temperature": dict(sample_method="sample", temperature=0.6),
            "top_k": dict(sample_method="sample", top_k=5, temperature=1.5),
            "top_p": dict(sample_method="sample", top_p=0.8),
            "all": dict(sample_method="sample", temperature=0.8, top_k=20, top_p=0.9, decoding_constraint=True,
                        block_trigrams=True),
            "sample_n": dict(sample_method="sample", sample_n=3, top_p=0.95),
            "greedy_n": dict(sample_n=2, decoding_constraint=True)}


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("name", list(SAMPLING))
def test_native_sampling_loop_equals_the_python_loop(k, name, sat, data):
    """Drawn words (temperature, top-k, top-p, constraints, several samples per image) and greedy rows of
    several per image: one native call gives exactly what sample()'s Python loop gives over the same native
    steps, and takes the very same numbers from the generator (its state ends equal), seeded or the default."""
    opts = DecodeOptions(max_length=16, **SAMPLING[name])
    feats, masks = data
    images = max(1, min(feats.size(0), 64 // (opts.sample_n * k)))
    feats, masks = feats[:images], masks[:images]
    decoder = Decoder.prepare(sat(k), compile=True)
    rows = images * opts.sample_n
    for seed in (0, 1):
        native_g, python_g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            assert decoder.sample(decoder.prefill(feats, masks, opts.sample_n, opts.max_length), opts,
                                  torch.Generator()) is not None  # sample() takes the native loop
            got = sample(decoder.prefill(feats, masks, opts.sample_n, opts.max_length), rows, opts, native_g)
            expected = sample(PythonLoop(decoder.prefill(feats, masks, opts.sample_n, opts.max_length)), rows, opts,
                              python_g)
        for field in ("seq", "logprobs", "scores", "draws", "draw_logprobs"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), (seed, field)
        assert torch.equal(native_g.get_state(), python_g.get_state())
    torch.manual_seed(5)
    with torch.no_grad():
        default = decode(decoder, feats, masks, opts)
        torch.manual_seed(5)
        expected = sample(PythonLoop(decoder.prefill(feats, masks, opts.sample_n, opts.max_length)), rows, opts)
    assert torch.equal(default.seq, expected.seq) and torch.equal(default.draws, expected.draws)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
def test_native_sampling_draws_and_top_1_is_greedy(k, sat, data):
    """The draws vary with the seed and follow the model: with top_k=1 every draw is the argmax (greedy's
    captions exactly); several samples of one image differ."""
    feats, masks = data
    decoder = Decoder.prepare(sat(k), compile=True)
    with torch.no_grad():
        greedy = decode(decoder, feats, masks, DecodeOptions())
        top1 = decode(decoder, feats, masks, DecodeOptions(sample_method="sample", top_k=1),
                      generator=torch.Generator().manual_seed(0))
        drawn = [decode(decoder, feats, masks, DecodeOptions(sample_method="sample", sample_n=4),
                        generator=torch.Generator().manual_seed(s)).seq for s in (0, 0, 1)]
    assert torch.equal(top1.seq, greedy.seq) and torch.equal(top1.logprobs, greedy.logprobs)
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    per_image = drawn[0].view(feats.size(0), 4, -1)
    assert any(len({tuple(row.tolist()) for row in image}) > 1 for image in per_image)


@needs_kernel
def test_native_ensemble_sampling_equals_the_python_loop(sat, data):
    feats, masks = data
    ensemble = Ensemble([Decoder.prepare(sat(2), compile=True), Decoder.prepare(sat(2, seed=3), compile=True)],
                        weights=[1.0, 2.0])
    opts = DecodeOptions(sample_method="sample", sample_n=2, temperature=0.9, max_length=12)
    with torch.no_grad():
        got = decode(ensemble, feats, masks, opts, generator=torch.Generator().manual_seed(4))
        stepper = start(ensemble, feats, masks, 2, 12)
        stepper.native_states = lambda: None  # the members step natively, the loop runs in Python
        expected = sample(stepper, feats.size(0) * 2, opts, torch.Generator().manual_seed(4))
    for field in ("seq", "logprobs", "draws", "draw_logprobs"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


@needs_kernel
def test_native_sampling_loop_is_not_used_where_the_python_loop_must_run(sat, data):
    feats, masks = data
    decoder = Decoder.prepare(sat(2), compile=True)
    state = decoder.prefill(feats, masks, 1, 10)
    ten = DecodeOptions(max_length=10)
    with torch.no_grad():
        state.step(torch.zeros(feats.size(0), 2, dtype=torch.long))
        assert decoder.sample(state, ten) is None  # already stepped
        traced = Decoder.prepare(sat(2), compile="torchscript")
        assert traced.sample(traced.prefill(feats, masks, 1, 10), ten) is None
        train_mode = Decoder.prepare(sat(2), compile=True)
        train_mode.model.train()  # dropout while decoding: the eager step, every row its own masks
        assert train_mode.sample(train_mode.prefill(feats, masks, 1, 10), ten) is None
    assert decoder.sample(decoder.prefill(feats, masks, 1, 10), ten) is None  # grad on: the Python loop keeps the graph
    with torch.no_grad():  # more beams in all than outputs, in groups of fewer: the native beam search runs them
        wide = DecodeOptions(beam_size=40, beam_groups=4, max_length=4)
        assert decoder.config.num_outputs < 40
        assert decoder.beam_search(decoder.prefill(feats[:1], masks[:1], 40, 4), 1, wide) is not None
    with torch.no_grad():  # the native beam search takes a state of beam_size rows per image, and no other
        assert decoder.beam_search(decoder.prefill(feats, masks, 1, 10), feats.size(0), DecodeOptions(beam_size=3,
                                   max_length=10)) is None


@needs_kernel
def test_a_decoder_used_in_eval_mode_runs_its_models_layers_once_the_model_trains(sat, data):
    """A decoder gathers its native weights once; switched to train mode afterwards (dropout while decoding), the
    model's own layers run the steps, and the native loops step aside."""
    feats, masks = data
    decoder = Decoder.prepare(sat(2), compile=True)
    ten, beams = DecodeOptions(max_length=10), DecodeOptions(beam_size=3, max_length=10)
    with torch.no_grad():
        assert decoder.sample(decoder.prefill(feats, masks, 1, 10), ten) is not None
        decoder.model.train()
        assert decoder.sample(decoder.prefill(feats, masks, 1, 10), ten) is None
        assert decoder.beam_search(decoder.prefill(feats, masks, 3, 10), feats.size(0), beams) is None
        calls = []
        hook = decoder.model.generator.register_forward_hook(lambda *args: calls.append(args[2].shape))
        decoder.step(decoder.prefill(feats, masks, 1, 10), torch.zeros(feats.size(0), 2, dtype=torch.long))
        hook.remove()
    assert calls == [(feats.size(0), 2, decoder.config.num_outputs)]


BEAM_OPTIONS = [dict(beam_size=3), dict(beam_size=2, n_best=2), dict(beam_size=5, max_length=9),
                dict(beam_size=3, length_penalty="wu_0.9"), dict(beam_size=3, length_penalty="avg_1"),
                dict(beam_size=4, suppress_unk=False, n_best=3, max_length=7)]


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("settings", BEAM_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_native_beam_search_equals_the_python_beam_search(k, settings, sat, data):
    """One native call for the whole beam search gives exactly what beam_search()'s Python loop gives over
    the same native steps: captions, log-probs and scores, ties and finished-beam ranking included."""
    feats, masks = data
    opts = DecodeOptions(**settings)
    images = max(1, min(feats.size(0), 64 // (opts.beam_size * k)))  # a few images keep the test short
    feats, masks = feats[:images], masks[:images]
    decoder = Decoder.prepare(sat(k), compile=True)
    with torch.no_grad():
        state = decoder.prefill(feats, masks, opts.beam_size, opts.max_length)
        native = decoder.beam_search(state, images, opts)
        assert native is not None
        got = beam_search(decoder.prefill(feats, masks, opts.beam_size, opts.max_length), images, opts)
        expected = beam_search(PythonLoop(decoder.prefill(feats, masks, opts.beam_size, opts.max_length)), images, opts)
    for name in ("seq", "logprobs", "scores"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert torch.equal(native[0], expected.seq)


GROUP_OPTIONS = [dict(beam_size=4, beam_groups=2), dict(beam_size=6, beam_groups=3, diversity_lambda=0.9, n_best=6),
                 dict(beam_size=4, beam_groups=2, length_penalty="wu_0.9", decoding_constraint=True, max_length=9),
                 dict(beam_size=2, beam_groups=2, block_trigrams=True, suppress_unk=False)]


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("settings", GROUP_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_native_diverse_beam_search_equals_the_python_beam_search(k, settings, sat, data):
    """Diverse beam search with its groups advancing together (decode's route for K > 1) runs natively, with
    exactly the Python loop's captions, log-probs and scores, each group's beams after the earlier groups'."""
    feats, masks = data
    opts = DecodeOptions(**settings)
    images = max(1, min(feats.size(0), 64 // (opts.beam_size * k)))
    feats, masks = feats[:images], masks[:images]
    decoder = Decoder.prepare(sat(k, seed=30 + k), compile=True)
    with torch.no_grad():
        native = decoder.beam_search(decoder.prefill(feats, masks, opts.beam_size, opts.max_length), images, opts)
        assert native is not None
        got = beam_search(decoder.prefill(feats, masks, opts.beam_size, opts.max_length), images, opts)
        expected = beam_search(PythonLoop(decoder.prefill(feats, masks, opts.beam_size, opts.max_length)), images, opts)
        plain = beam_search(decoder.prefill(feats, masks, opts.beam_size, opts.max_length), images,
                            dataclasses.replace(opts, diversity_lambda=0.0))
    for name in ("seq", "logprobs", "scores"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    if opts.n_best == opts.beam_size:  # the penalty acts: later groups' beams change
        assert not torch.equal(got.seq, plain.seq)


@needs_kernel
@pytest.mark.parametrize("settings", GROUP_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_native_staggered_beam_search_equals_the_python_one(settings, sat, data, monkeypatch):
    """Diverse beam search for K=1, each group a position behind the one before (decode's route, the
    reference's), runs natively over one cache, with exactly the Python search's captions, log-probs and
    scores; and so does an ensemble of two. decode() takes the native search, not the Python one."""
    def python_search(*args, **kwargs):
        raise AssertionError("decode ran the Python staggered search")

    feats, masks = data
    opts = DecodeOptions(**settings)
    width = opts.beam_size // opts.beam_groups
    for model in (Decoder.prepare(sat(1, seed=40), compile=True), ensemble_of_two(sat, 1)):
        with torch.no_grad():
            state = start(model, feats, masks, width, opts.max_length)
            assert native_beam_search(*native_members(state), feats.size(0), opts, staggered=True) is not None
            with monkeypatch.context() as patched:
                patched.setattr("satic.decoding.search.staggered_beam_search", python_search)
                got = decode(model, feats, masks, opts)
            expected = staggered_beam_search(lambda: PythonLoop(start(model, feats, masks, width, opts.max_length)),
                                             feats.size(0), opts)
        for name in ("seq", "logprobs", "scores"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


def repeats_trigram(words: list[int]) -> bool:
    trigrams = [tuple(words[j:j + 3]) for j in range(len(words) - 2)]
    return len(set(trigrams)) < len(trigrams)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("beam", [1, 3])
def test_native_loops_with_decoding_constraints_equal_the_python_loops(k, beam, sat, data):
    """decoding_constraint and block_trigrams in the native greedy and beam search loops give exactly what the
    Python loops give over the same native steps; and they act: no word follows itself, and the captions
    that repeat a trigram without block_trigrams change with it."""
    feats, masks = data
    images = max(1, min(feats.size(0), 64 // (beam * k)))
    feats, masks = feats[:images], masks[:images]
    model = sat(k, seed=20 + k)
    with torch.no_grad():
        model.generator.bias[0] = -1e4  # captions of 20 words: room for repeats
    decoder = Decoder.prepare(model, compile=True)
    plain = decode(decoder, feats, masks, DecodeOptions(beam_size=beam))
    repeated = [i for i, row in enumerate(plain.seq.tolist()) if repeats_trigram(row)]
    assert repeated and any(a == b for row in plain.seq.tolist() for a, b in zip(row, row[1:]))
    for settings in (dict(decoding_constraint=True), dict(block_trigrams=True),
                     dict(decoding_constraint=True, block_trigrams=True)):
        opts = DecodeOptions(beam_size=beam, **settings)
        with torch.no_grad():
            state = decoder.prefill(feats, masks, opts.decoder_rows, opts.max_length)
            native = (decoder.beam_search(state, images, opts) if beam > 1 else decoder.sample(state, opts))
            assert native is not None
            got = decode(decoder, feats, masks, opts)
            loop = PythonLoop(decoder.prefill(feats, masks, opts.decoder_rows, opts.max_length))
            expected = beam_search(loop, images, opts) if beam > 1 else sample(loop, images, opts)
        for name in ("seq", "logprobs", "scores"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (settings, name)
        native_rows = got.seq
        if beam == 1:  # captions that end early: the draws of finished rows read the output's 0s
            ending = Decoder.prepare(sat(k), compile=True)
            with torch.no_grad():
                got = decode(ending, feats, masks, opts)
                expected = sample(PythonLoop(ending.prefill(feats, masks, 1, opts.max_length)), images, opts)
            assert bool((got.seq[:, :-opts.max_length // 2] == 0).any())  # some end in the first half
            for name in ("seq", "logprobs", "draws", "draw_logprobs"):
                assert torch.equal(getattr(got, name), getattr(expected, name)), (settings, name)
        rows = native_rows.tolist()
        if opts.decoding_constraint:
            assert all(a != b or a == 0 for row in rows for a, b in zip(row, row[1:]))
        if opts.block_trigrams:
            assert any(rows[i] != plain.seq[i].tolist() for i in repeated)


@needs_kernel
def test_native_beam_search_is_not_used_where_the_python_loop_must_run(sat, data):
    feats, masks = data
    decoder = Decoder.prepare(sat(2), compile=True)
    with torch.no_grad():
        state = decoder.prefill(feats, masks, 3, 10)
        state.step(torch.zeros(feats.size(0) * 3, 2, dtype=torch.long))
        assert decoder.beam_search(state, feats.size(0), DecodeOptions(beam_size=3, max_length=10)) is None  # stepped
        traced = Decoder.prepare(sat(2), compile="torchscript")
        assert traced.beam_search(traced.prefill(feats, masks, 3, 10), feats.size(0),
                                  DecodeOptions(beam_size=3, max_length=10)) is None  # not the native step


def ensemble_of_two(sat, k: int) -> Ensemble:
    """Two compiled members of one K, weighted 2:1, that differ in weights and in size: the fixture's model
    and a random one of one layer, 2 heads and another d_ff."""
    model = sat(k, seed=3)
    torch.manual_seed(k)
    small = SATModel(dataclasses.replace(model.config, num_layers=1, num_heads=2, d_ff=24)).eval()
    return Ensemble([Decoder.prepare(m, compile=True) for m in (model, small)], weights=[2.0, 1.0])


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("settings", [dict(), dict(max_length=7), *BEAM_OPTIONS[:4]],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "greedy")
def test_native_ensemble_loops_equal_the_python_loop(k, settings, sat, data):
    """An ensemble's greedy and beam search run natively over all its members in one call, and give exactly
    what the Python loops give over the members' native steps mixed by EnsembleStepper."""
    feats, masks = data
    opts = DecodeOptions(**settings)
    if opts.max_length < k:
        pytest.skip("shorter than one group")
    images = max(1, min(feats.size(0), 64 // (opts.beam_size * k)))  # a few images keep the test short
    feats, masks = feats[:images], masks[:images]
    ensemble = ensemble_of_two(sat, k)
    with torch.no_grad():
        states = start(ensemble, feats, masks, opts.decoder_rows, opts.max_length)
        assert native_members(states) is not None
        native = decode(ensemble, feats, masks, opts)
        loop = PythonLoop(start(ensemble, feats, masks, opts.decoder_rows, opts.max_length))
        expected = (beam_search(loop, images, opts) if opts.beam_size > 1 else sample(loop, images, opts))
    assert loop.steps > 0
    for name in ("seq", "logprobs", "scores"):
        assert torch.equal(getattr(native, name), getattr(expected, name)), name
    members = [decode(member, feats, masks, opts) for member in ensemble.models]
    assert not all(torch.equal(native.seq, m.seq) for m in members)  # the mixture, not one member's captions


@needs_kernel
def test_native_mixture_equals_the_formula():
    """mix_logprobs, the native loops' mixture, is log(sum_m w_m exp(lp_m) / sum_m w_m) to float rounding,
    masked words (-1e9) and a length that fills no 8-lane block included."""
    g = torch.Generator().manual_seed(0)
    logprobs = [torch.randn(3, 2, 37, generator=g).log_softmax(-1) for _ in range(3)]
    for lp in logprobs:
        lp[..., 5] = -1e9
    logprobs[0][0, 0, 7] = logprobs[1][0, 0, 7] = logprobs[2][0, 0, 7] = -1e9
    weights = [0.5, 2.0, 1.5]
    got = torch.ops.satic_small_gemm.mix_logprobs(logprobs, weights)
    expected = sum(w * lp.double().exp() for w, lp in zip(weights, logprobs)).div(sum(weights)).log()
    assert got.dtype == torch.float32 and got.shape == (3, 2, 37)
    assert torch.isneginf(got[..., 5]).all() and torch.isneginf(got[0, 0, 7])
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite].double(), expected[finite], atol=2e-6, rtol=0)


@needs_kernel
def test_native_ensemble_loop_is_not_used_where_a_member_cannot_run_it(sat, data):
    feats, masks = data
    ensemble = Ensemble([Decoder.prepare(sat(2), compile=True), Decoder.prepare(sat(2, seed=1), compile="torchscript")])
    with torch.no_grad():
        assert native_members(start(ensemble, feats, masks, 1, 10)) is not None  # both are DecodeStates
        states = native_members(start(ensemble, feats, masks, 1, 10))
        assert native_sample(*states, DecodeOptions(max_length=10)) is None  # a traced member
        assert not start(ensemble, feats, masks, 1, 10).native  # nor does it mix natively
        expected = decode(Ensemble([Decoder(m) for m in (sat(2), sat(2, seed=1))]), feats, masks, DecodeOptions())
        assert torch.equal(decode(ensemble, feats, masks, DecodeOptions()).seq, expected.seq)


@needs_kernel
@pytest.mark.parametrize("k", [1, 3])
def test_native_decoding_of_odd_sizes_equals_eager(k):
    """Sizes that fill no SIMD lane or 16-column panel evenly: d_model 42 (3 heads of 14), d_ff 50, 30 words,
    17-dim features, 7 regions with masks; one layer, so the words are decided by one set of weights."""
    from satic.model import ModelConfig, SATModel

    torch.manual_seed(k)
    config = ModelConfig(vocab_size=29, group_size=k, num_layers=1, d_model=42, d_ff=50, num_heads=3,
                         att_feat_size=17, max_positions=40)
    model = SATModel(config).eval()
    feats = torch.randn(3, 7, 17)
    masks = torch.arange(7)[None, :] < torch.tensor([[7], [4], [1]])
    for opts in (DecodeOptions(max_length=12), DecodeOptions(beam_size=3, max_length=12)):
        expected = decode(Decoder(model), feats, masks, opts)
        decoder = Decoder.prepare(model, compile=True)
        got = decode(decoder, feats, masks, opts)
        assert native_decoder_weights(decoder.model) is not None and decoder.recordings() == (0, 0)
        assert torch.equal(got.seq, expected.seq)
        torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    native, _ = run_steps(Decoder.prepare(model, compile=True), feats, masks, 2, 3, seed=k)
    traced, _ = run_steps(Decoder.prepare(model, compile="torchscript"), feats, masks, 2, 3, seed=k)
    torch.testing.assert_close(native, traced, atol=1e-5, rtol=0)


@needs_kernel
def test_native_beam_search_takes_as_many_beams_as_outputs_and_spends_its_state():
    """A beam as wide as the outputs (vocabulary + end) runs natively, one wider does not; the state a native
    search ran over is spent (its cache full), so a second native search or sampling loop over it is refused."""
    from satic.model import ModelConfig, SATModel

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=3, group_size=2, num_layers=1, d_model=16, d_ff=32, num_heads=2,
                         att_feat_size=8, max_positions=12)
    decoder = Decoder.prepare(SATModel(config).eval(), compile=True)
    feats, masks = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    assert config.num_outputs == 4
    with torch.no_grad():
        opts = DecodeOptions(beam_size=4, max_length=6)
        state = decoder.prefill(feats, masks, 4, 6)
        assert decoder.beam_search(state, 2, opts) is not None
        assert state.cache.length == 6
        assert decoder.beam_search(state, 2, opts) is None
        assert decoder.sample(state, DecodeOptions(max_length=6)) is None
        wide = DecodeOptions(beam_size=5, max_length=6)
        assert decoder.beam_search(decoder.prefill(feats, masks, 5, 6), 2, wide) is None


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_beam_search_with_a_negative_diversity_lambda_does_not_stop_early(seed, tiny_model):
    """As the Python search: a negative diversity_lambda raises later groups' sums, so no early stop; an image's
    captions do not depend on the batch, and equal the eager search's."""
    model = tiny_model(2, eos_bias=2.0, seed=seed)
    feats = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(seed))
    opts = DecodeOptions(beam_size=4, beam_groups=2, diversity_lambda=-2.0, max_length=12, n_best=4)
    decoder = Decoder.prepare(model, compile=True)
    both = decode(decoder, feats, None, opts)
    assert torch.equal(both.seq, decode(Decoder.prepare(model), feats, None, opts).seq)
    for i in range(3):
        assert torch.equal(decode(decoder, feats[i:i + 1], None, opts).seq, both.seq[4 * i:4 * i + 4]), i


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
def test_native_loop_penalties_round_as_the_python_loop(k, tiny_model):
    """block_trigrams and diversity penalties of 3+ uses (3 * -1.386, 3 * 0.3 are not exact in float32) round as
    torch's separate multiply and add, not as one fused multiply-add: the native beam search equals the Python loop
    over the same native steps to the bit. Two words and no ending: trigrams repeat at once."""
    model = tiny_model(k, eos_bias=-1e4, vocab=2)
    feats = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(k))
    decoder = Decoder.prepare(model, compile=True)
    for opts in (DecodeOptions(beam_size=2, block_trigrams=True, max_length=16),
                 DecodeOptions(beam_size=6, beam_groups=2, diversity_lambda=0.3, max_length=8, n_best=6)):
        with torch.no_grad():
            got = decode(decoder, feats, None, opts)
            if opts.beam_groups > 1 and k == 1:
                continue  # staggered: covered by test_native_staggered_beam_search_equals_the_python_one
            expected = beam_search(PythonLoop(decoder.prefill(feats, None, opts.beam_size, opts.max_length)), 2, opts)
        for name in ("seq", "logprobs", "scores"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (opts, name)


@needs_kernel
def test_native_sampling_without_any_allowed_word_ends_the_caption(tiny_model):
    """An ensemble whose mixture underflows to -inf for the end word, and decoding_constraint forbidding the only
    other word: no word can be drawn. Both loops take word 0 (as greedy's argmax), neither the forbidden word
    (the native loop's old clamp) nor an out-of-range index (the Python loop's old IndexError)."""
    models = []
    for seed in (0, 1):
        model = tiny_model(1, eos_bias=0.0, vocab=1, seed=seed)
        with torch.no_grad():
            model.generator.weight.zero_()
            model.generator.bias.copy_(torch.tensor([-200.0, 0.0]))  # exp(-200) underflows in float32
        models.append(Decoder.prepare(model, compile=True))
    ensemble = Ensemble(models)
    feats = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    opts = DecodeOptions(sample_method="sample", decoding_constraint=True, max_length=4, sample_n=2)
    with torch.no_grad():
        got = decode(ensemble, feats, None, opts, generator=torch.Generator().manual_seed(0))
        state = start(ensemble, feats, None, 2, 4)
        expected = sample(PythonLoop(state), 4, opts, torch.Generator().manual_seed(0))
    assert got.seq.tolist() == [[1, 0, 0, 0]] * 4
    for name in ("seq", "logprobs", "draws"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
