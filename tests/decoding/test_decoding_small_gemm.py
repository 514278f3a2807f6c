import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from satic.decoding import DecodeOptions, decode, prepare_for_inference
from satic.decoding.small_gemm import MAX_ROWS, SmallRowLinear, load_kernel, pack_weight
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
    assert not isinstance(prepare_for_inference(model, "int8").generator, SmallRowLinear)  # auto: fp32 only
