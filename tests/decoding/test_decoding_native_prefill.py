"""The native ops of csrc/encoder.cpp: the prefill (the model's encode + memory_kv + pad_regions in one
call) and the fused inference attention."""
import pytest
import torch

from satic.decoding import Decoder
from satic.decoding.engine import REGION_BUCKET, native_encoder_weights, pad_regions
from satic.decoding.small_gemm import build_problem, fused_attend
from satic.evaluation.timing import torch_threads
from satic.model.layers import Dropout
from satic.model.transformer import NEG_INF, attend, merge_heads
from satic.errors import SaticError

needs_kernel = pytest.mark.skipif(build_problem() is not None,
                                  reason=f"small-row kernel unavailable: {build_problem()}")


def prefill_of(decoder: Decoder, feats, masks):
    """The regions' keys/values and bias a decoder's prefill gives (what every step then reads)."""
    state = decoder.prefill(feats, masks)
    return state.memory_kv, state.memory_bias


def eager_prefill(decoder: Decoder, feats, masks):
    with torch.no_grad():
        memory, bias = decoder.model.encode(feats, masks)
        return pad_regions(decoder.model.memory_kv(memory, bias), bias)


def assert_same_prefill(native, eager, atol=2e-5, rtol=1e-5):
    (kv, bias), (kv_ref, bias_ref) = native, eager
    assert torch.equal(bias, bias_ref)
    assert len(kv) == len(kv_ref)
    for (k, v), (k_ref, v_ref) in zip(kv, kv_ref):
        assert k.shape == k_ref.shape and k.is_contiguous() and v.is_contiguous()
        torch.testing.assert_close(k, k_ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(v, v_ref, atol=atol, rtol=rtol)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
def test_native_prefill_equals_the_model(k, sat, data):
    feats, masks = data  # several images, padded regions of different counts
    decoder = Decoder.prepare(sat(k), compile=True)
    assert native_encoder_weights(decoder.model) is not None
    g = torch.Generator().manual_seed(k)
    holes = masks & (torch.rand(masks.shape, generator=g) > 0.3)  # regions missing inside the valid ones too
    holes[:, 0] = True
    for m in (masks, holes, None):
        native = prefill_of(decoder, feats, m)
        assert native[0][0][0].size(2) % REGION_BUCKET == 0
        assert_same_prefill(native, eager_prefill(decoder, feats, m))
    for image in range(feats.size(0)):  # batch 1, cropped to its real regions as the latency path feeds it
        n = int(masks[image].sum())
        one = feats[image:image + 1, :n]
        assert_same_prefill(prefill_of(decoder, one, None), eager_prefill(decoder, one, None))


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
def test_native_int8_prefill_equals_the_int8_model(k, sat, data):
    """int8 weights (the same kernel layers as the eager int8 model): the native prefill's keys and values
    equal the model's encode + memory_kv up to float rounding, where an activation that lands on another
    int16 level moves an output by about its scale."""
    feats, masks = data
    decoder = Decoder.prepare(sat(k), "int8", compile=True)
    weights = native_encoder_weights(decoder.model)
    assert weights is not None and any(w.dtype == torch.int8 for w in weights)
    one = feats[:1, : int(masks[0].sum())]  # batch 1, as the latency path feeds it
    for f, m in ((feats, masks), (feats, None), (one, None)):
        assert_same_prefill(prefill_of(decoder, f, m), eager_prefill(decoder, f, m), atol=2e-4, rtol=1e-4)


@needs_kernel
def test_native_prefill_threads_and_batching_do_not_change_it(sat, data):
    feats, masks = data
    decoder = Decoder.prepare(sat(2), compile=True)
    with torch_threads(1):
        single = prefill_of(decoder, feats, masks)
    with torch_threads(2):
        double = prefill_of(decoder, feats, masks)
    assert all(torch.equal(a, b) for pa, pb in zip(single[0], double[0]) for a, b in zip(pa, pb))
    one = prefill_of(decoder, feats[1:2], masks[1:2])  # an image alone: its rows as in the batch
    regions = one[0][0][0].size(2)
    torch.testing.assert_close(one[0][0][0][0], single[0][0][0][1, :, :regions], atol=0, rtol=0)


@needs_kernel
def test_native_prefill_bad_input_gets_the_models_messages(sat, data):
    feats, masks = data
    decoder = Decoder.prepare(sat(1), compile=True)
    bad = feats.clone()
    bad[0, 0, 3] = float("nan")
    with pytest.raises(SaticError, match="NaN or infinite"):
        decoder.prefill(bad, masks)
    empty = masks.clone()
    empty[1] = False
    with pytest.raises(SaticError, match="no valid region"):
        decoder.prefill(feats, empty)
    with pytest.raises(SaticError, match="this model expects"):
        decoder.prefill(feats[..., :-1], masks)
    with pytest.raises(SaticError, match="region mask has shape"):
        decoder.prefill(feats, masks[:, :-1])
    with pytest.raises(SaticError, match=r"^region features have shape \(7, 32\) but this model expects \(batch, "):
        decoder.prefill(feats[0, :7], None)
    with pytest.raises(SaticError, match=r"^region features have shape \(1, 32, 31\) but this model expects"):
        decoder.prefill(torch.ones(1, 32, 31), None)  # as many regions as the model's feature size
    with pytest.raises(SaticError, match="^region features have no regions; every image needs at least one region$"):
        decoder.prefill(feats[:, :0], None)


@needs_kernel
def test_an_eager_decoder_of_kernel_layers_prefills_with_the_models_own_encode(sat, data):
    """compile=False keeps the model's encode and memory_kv (the eager numbers native calls are checked
    against): no native call, no regions padded to the bucket."""
    feats, masks = data
    eager = Decoder.prepare(sat(1))
    assert native_encoder_weights(eager.model) is not None
    one = feats[:1, :17]
    kv, bias = prefill_of(eager, one, None)
    assert bias is None and all(t.size(2) == 17 for pair in kv for t in pair)
    with torch.no_grad():
        expected = eager.model.memory_kv(*eager.model.encode(one, None))
    assert all(torch.equal(t, e) for pair, pair_e in zip(kv, expected) for t, e in zip(pair, pair_e))


@needs_kernel
@pytest.mark.parametrize("queries,keys,bias_rows", [(1, 20, 1), (2, 20, 1), (12, 48, 3), (5, 7, None), (64, 36, 3)])
def test_fused_attention_equals_the_models(queries, keys, bias_rows):
    g = torch.Generator().manual_seed(queries * 100 + keys)
    q, k, v = (torch.randn(3, 4, n, 32, generator=g) for n in (queries, keys, keys))
    bias = None
    if bias_rows is not None:  # the last slots hidden, as a static cache's unwritten slots or padded regions
        bias = torch.zeros(bias_rows, 1, 1, keys)
        bias[..., keys // 2:] = NEG_INF
    dropout = Dropout(0.0)
    expected = attend(q, k, v, bias, dropout)
    torch.testing.assert_close(fused_attend(q, k, v, bias, dropout), expected, atol=1e-5, rtol=1e-5)
    # q as a step makes it: a strided view into the fused QKV projection, heads transposed
    qkv = torch.stack([q, q, q]).permute(1, 3, 0, 2, 4).contiguous()  # (B, L, 3, H, dk)
    strided_q = qkv.permute(2, 0, 3, 1, 4)[0]
    assert not strided_q.is_contiguous() and torch.equal(strided_q, q)
    out = fused_attend(strided_q, k.transpose(2, 3).contiguous().transpose(2, 3), v, bias, dropout)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    merged = merge_heads(out)  # (B, L, d): a view of the kernel's output, no copy
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()
    assert torch.equal(merged, merge_heads(out.contiguous()))
    if queries > 1:  # a bias per query row (training masks) goes to torch's path
        per_query = torch.zeros(3, 1, queries, keys)
        assert torch.equal(fused_attend(q, k, v, per_query, dropout), attend(q, k, v, per_query, dropout))
        with pytest.raises(RuntimeError, match="bias must be"):
            torch.ops.satic_small_gemm.attention(q, k, v, per_query)


@needs_kernel
def test_native_decoding_gives_the_same_numbers_on_any_number_of_threads(sat, data):
    """The native loops split panels, rows and heads over torch's threads; every number is computed by one
    thread in the same order, so two threads give one thread's keys, values, captions and log-probs, bit
    for bit (a batch encoded at once equals its images encoded alone, too)."""
    from satic.decoding import DecodeOptions, decode

    feats, masks = data
    decoder = Decoder.prepare(sat(2), compile=True)
    runs = {}
    for threads in (1, 2):
        with torch_threads(threads):
            prefill = prefill_of(decoder, feats, masks)
            greedy = decode(decoder, feats, masks, DecodeOptions(max_length=12))
            beam = decode(decoder, feats, masks, DecodeOptions(beam_size=3, max_length=12))
        runs[threads] = (prefill, greedy, beam)
    (kv1, bias1), greedy1, beam1 = runs[1]
    (kv2, bias2), greedy2, beam2 = runs[2]
    assert torch.equal(bias1, bias2) and all(torch.equal(a, b) for p, q in zip(kv1, kv2) for a, b in zip(p, q))
    for one, two in ((greedy1, greedy2), (beam1, beam2)):
        assert torch.equal(one.seq, two.seq) and torch.equal(one.logprobs, two.logprobs)
    n = int(masks[1].sum())  # image 1 alone: its rows of the batched prefill, bit for bit
    (kv_alone, _) = prefill_of(decoder, feats[1:2, :n], None)
    assert all(torch.equal(a[0, :, :n], b[1, :, :n]) for p, q in zip(kv_alone, kv1) for a, b in zip(p, q))
