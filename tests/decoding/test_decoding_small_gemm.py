import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from satic.decoding import DecodeOptions, decode, prepare_for_inference
from satic.decoding.small_gemm import MAX_ROWS, Int8WeightLinear, SmallRowLinear, load_kernel, pack_weight, quantize_rows
from satic.errors import SaticError
from satic.model import SATModel

needs_kernel = pytest.mark.skipif(load_kernel() is not None, reason=f"small-row kernel unavailable: {load_kernel()}")


def test_pack_weight_layout():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)  # (N=20, K=3): two panels, the second padded
    packed = pack_weight(weight)  # (2, 3, 16)
    assert packed.shape == (2, 3, 16)
    assert torch.equal(packed[0], weight[:16].t())
    assert torch.equal(packed[1, :, :4], weight[16:].t())
    assert torch.equal(packed[1, :, 4:], torch.zeros(3, 12))


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(16, 8), (37, 64), (512, 2048), (9487, 32), (48, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_linear(out_features, in_features, bias):
    g = torch.Generator().manual_seed(out_features + in_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) / in_features ** 0.5)
    fast = SmallRowLinear(linear)
    for rows in [*range(1, 17), 36, MAX_ROWS]:
        x = torch.randn(rows, in_features, generator=g)
        torch.testing.assert_close(fast(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
    batched = torch.randn(2, 3, in_features, generator=g)  # leading dimensions are kept
    torch.testing.assert_close(fast(batched), linear(batched), atol=1e-5, rtol=1e-5)
    many = torch.randn(MAX_ROWS + 1, in_features, generator=g)  # more rows: torch's linear, bit for bit
    assert torch.equal(fast(many), F.linear(many, linear.weight, linear.bias))


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("trace", [False, True])
def test_decoding_with_kernel_gives_the_same_captions(k, beam, trace, reference):
    base, feats, masks = reference
    model = SATModel(dataclasses.replace(base.config, group_size=k))
    model.load_state_dict(base.state_dict())
    plain = prepare_for_inference(model, "fp32", kernel="torch")
    fast = prepare_for_inference(model, "fp32", trace=trace, kernel="small_gemm")
    assert isinstance(fast.generator, SmallRowLinear) and not isinstance(plain.generator, SmallRowLinear)
    assert isinstance(fast.decoder_layers[0].self_attn.qkv, SmallRowLinear)
    assert isinstance(fast.region_embed, SmallRowLinear) and isinstance(fast.encoder_layers[0].ffn.w1, SmallRowLinear)
    opts = DecodeOptions(beam_size=beam)
    expected = decode(plain, feats, masks, opts)
    for image in range(feats.size(0)):  # batch 1: the rows the kernel serves
        one = decode(fast, feats[image:image + 1], masks[image:image + 1], opts)
        assert torch.equal(one.seq[0], expected.seq[image])
        torch.testing.assert_close(one.logprobs[0], expected.logprobs[image], atol=1e-5, rtol=0)


def test_kernel_option_errors(reference):
    model = reference[0]
    with pytest.raises(SaticError, match="kernel"):
        prepare_for_inference(model, "fp32", kernel="mkl")
    with pytest.raises(SaticError, match="small_gemm"):
        prepare_for_inference(model, "bf16", kernel="small_gemm")
    if load_kernel() is None:
        assert isinstance(prepare_for_inference(model, "int8").generator, Int8WeightLinear)
    assert not isinstance(prepare_for_inference(model, "int8", kernel="torch").generator, Int8WeightLinear)


def test_quantize_rows_round_trip():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 20, generator=g) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different size
    weight[5] = 0.0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and torch.equal(q[5], torch.zeros(20, dtype=torch.int8))
    assert bool(((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-12).all())


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(37, 64), (512, 2048), (48, 7)])
def test_int8_kernel_equals_linear_with_dequantized_weight(out_features, in_features):
    g = torch.Generator().manual_seed(out_features)
    linear = nn.Linear(in_features, out_features)
    fast = Int8WeightLinear(linear)
    weight = fast.dequantized_weight()
    q, scale = quantize_rows(linear.weight)
    assert torch.equal(weight, q.float() * scale[:, None])
    for rows in [*range(1, 17), 36, 100]:  # every size through the kernel
        x = torch.randn(rows, in_features, generator=g)
        torch.testing.assert_close(fast(x), F.linear(x, weight, linear.bias), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("beam", [1, 3])
def test_int8_decoding_equals_fp32_with_the_rounded_weights(beam, reference):
    """int8 changes the weights only: decoding equals fp32 decoding of a model holding the rounded weights."""
    base, feats, masks = reference
    int8 = prepare_for_inference(base, "int8", trace=True)
    rounded = SATModel(base.config)
    rounded.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(int8.get_submodule(name).dequantized_weight())
    opts = DecodeOptions(beam_size=beam)
    expected = decode(prepare_for_inference(rounded, "fp32", kernel="torch"), feats, masks, opts)
    result = decode(int8, feats, masks, opts)
    assert torch.equal(result.seq, expected.seq)
    torch.testing.assert_close(result.logprobs, expected.logprobs, atol=1e-4, rtol=0)
