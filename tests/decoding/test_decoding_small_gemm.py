import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from satic.decoding import DecodeOptions, Decoder, decode, prepare_for_inference
from satic.decoding import small_gemm
from satic.decoding.small_gemm import (MAX_ROWS, FusedReferenceNorm, Int8WeightLinear, SmallRowLinear,
                                      activation_levels, build_problem, fused_attend, pack_pairs, pack_weight,
                                      quantize_rows, swap_layers)
from satic.errors import SaticError
from satic.model import ModelConfig, SATModel
from satic.model.layers import LayerNorm

needs_kernel = pytest.mark.skipif(build_problem() is not None,
                                  reason=f"small-row kernel unavailable: {build_problem()}")


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
@pytest.mark.parametrize("in_features, out_features", [(16, 37), (64, 37), (7, 37), (512, 600)])  # 600: streamed
def test_a_row_does_not_depend_on_the_rows_beside_it(in_features, out_features):
    """Every row is summed in one order whatever rows share its pass: a batch gives each image the bits it gets
    alone, so a near-tie between two captions breaks the same way in both. Also for no rows at all."""
    torch.manual_seed(in_features)
    fast = SmallRowLinear(nn.Linear(in_features, out_features))
    x = torch.randn(MAX_ROWS, in_features)
    alone = torch.cat([fast(x[i : i + 1]) for i in range(MAX_ROWS)])
    for rows in range(1, MAX_ROWS + 1):
        assert torch.equal(fast(x[:rows]), alone[:rows]), rows
    assert fast(x[:0]).shape == (0, out_features)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("trace", [False, True])
def test_decoding_with_kernel_gives_the_same_captions(k, beam, trace, reference):
    base, feats, masks = reference
    model = SATModel(dataclasses.replace(base.config, group_size=k))
    model.load_state_dict(base.state_dict())
    plain = prepare_for_inference(model, "fp32", kernel="torch")
    decoder = Decoder.prepare(model, "fp32", compile=trace, kernel="small_gemm")
    fast = decoder.model
    assert isinstance(fast.generator, SmallRowLinear) and not isinstance(plain.generator, SmallRowLinear)
    assert isinstance(fast.decoder_layers[0].self_attn.qkv, SmallRowLinear)
    assert isinstance(fast.region_embed, SmallRowLinear) and isinstance(fast.encoder_layers[0].ffn.w1, SmallRowLinear)
    assert (isinstance(fast.decoder_norm, FusedReferenceNorm)
            and isinstance(fast.encoder_layers[0].norm1, FusedReferenceNorm))
    opts = DecodeOptions(beam_size=beam)
    expected = decode(plain, feats, masks, opts)
    for image in range(feats.size(0)):  # batch 1: the rows the kernel serves
        one = decode(decoder, feats[image:image + 1], masks[image:image + 1], opts)
        assert torch.equal(one.seq[0], expected.seq[image])
        torch.testing.assert_close(one.logprobs[0], expected.logprobs[image], atol=1e-5, rtol=0)


@needs_kernel
@pytest.mark.parametrize("features", [2, 7, 512])
def test_fused_norm_equals_the_reference_norm(features):
    g = torch.Generator().manual_seed(features)
    norm = LayerNorm(features)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(features, generator=g))
        norm.bias.copy_(torch.randn(features, generator=g))
    fused = FusedReferenceNorm(norm)
    x = torch.randn(3, 5, features, generator=g) * 10 + 3
    x[0, 0] = 4.0  # a constant row: (x - mean) / eps = 0, the bias
    with torch.no_grad():
        expected = norm(x)
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused(x)[0, 0], norm.bias.detach())


def test_kernel_option_errors(reference):
    model = reference[0]
    with pytest.raises(SaticError, match="kernel"):
        prepare_for_inference(model, "fp32", kernel="mkl")
    with pytest.raises(SaticError, match="small_gemm"):
        prepare_for_inference(model, "bf16", kernel="small_gemm")
    if build_problem() is None:
        assert isinstance(prepare_for_inference(model, "int8").generator, Int8WeightLinear)
    assert not isinstance(prepare_for_inference(model, "int8", kernel="torch").generator, Int8WeightLinear)
    with pytest.raises(SaticError, match=r"^int8 inference runs on the CPU only, but the model is on meta; use "
                                         r"precision='bf16' on a GPU$"):
        prepare_for_inference(SATModel(model.config).to("meta"), "int8")


def test_torchs_int8_quantizes_quietly_and_cpu_copies_keep_eager_norms(reference):
    """kernel='torch' with int8 is torch's dynamic quantization (int8 weights), without its deprecation
    warnings; on the CPU no norm becomes a torch.compile'd one (that is for CUDA), whatever the precision."""
    from satic.decoding.cuda_graphs import CompiledReferenceNorm

    model = reference[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = prepare_for_inference(model, "int8", kernel="torch")
    assert caught == [] and quantized.generator.weight().dtype == torch.qint8
    for precision in ("fp32", "bf16", "int8"):
        for kernel in ("auto", "torch"):
            prepared = prepare_for_inference(model, precision, kernel=kernel)
            assert not any(isinstance(m, CompiledReferenceNorm) for m in prepared.modules()), (precision, kernel)


def test_quantize_rows_round_trip():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 20, generator=g) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different size
    weight[5] = 0.0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and torch.equal(q[5], torch.zeros(20, dtype=torch.int8))
    assert bool(((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-12).all())


def test_pack_pairs_layout():
    q = torch.arange(20 * 3, dtype=torch.int8).view(20, 3)  # (N=20, K=3): two panels and two pairs, both padded
    packed = pack_pairs(q)  # (2, 2, 32)
    assert packed.shape == (2, 2, 32)
    assert packed[0, 0, :4].tolist() == [q[0, 0], q[0, 1], q[1, 0], q[1, 1]]  # column 0 at inputs 0, 1; then column 1
    assert packed[0, 1, :4].tolist() == [q[0, 2], 0, q[1, 2], 0]  # input 3 is padding
    assert packed[1, 0, 6:8].tolist() == [q[19, 0], q[19, 1]] and not packed[1, :, 8:].any()  # columns 20.. padding


def test_activation_levels_keep_int32_sums_exact():
    for in_features in (7, 512, 2048, 4096, 10000):
        levels = activation_levels(in_features)
        products = 2 * -(-in_features // 2)
        assert 127 * levels * products <= 2**31 - 1 and (levels == 32767 or 127 * (levels + 1) * products > 2**31 - 1)
    assert activation_levels(512) == 32767 and activation_levels(2048) == 8256
    with pytest.raises(SaticError, match="kernel='torch'"):
        activation_levels(100_000)


def int8_reference(x: Tensor, layer: Int8WeightLinear) -> Tensor:
    """What the int8 kernel computes, in float64: each row rounded to int16 at max|x| / levels, times the
    int8 weights, scaled per row and column, plus the bias."""
    levels = activation_levels(x.size(-1))
    top = x.abs().amax(1, keepdim=True)
    # float32 as the kernel (levels / top is 1/top * levels)
    rounded = torch.round(x * (torch.full_like(top, levels) / top))
    weight = layer.dequantized_weight().double()
    return (rounded.double() * (top / levels).double()) @ weight.t() + layer.packed_bias[: weight.size(0)].double()


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(37, 64), (512, 2048), (48, 7), (40, 33)])
def test_int8_kernel_equals_its_definition(out_features, in_features):
    g = torch.Generator().manual_seed(out_features)
    linear = nn.Linear(in_features, out_features)
    fast = Int8WeightLinear(linear)
    q, scale = quantize_rows(linear.weight)
    assert torch.equal(fast.dequantized_weight(), q.float() * scale[:, None])
    for rows in [*range(1, 17), 36, 100]:  # every size through the kernel
        x = torch.randn(rows, in_features, generator=g) * torch.logspace(-2, 2, rows)[:, None]
        y = fast(x)
        expected = int8_reference(x, fast)  # float32 rounding of the scales and the output only:
        assert bool(((y.double() - expected).abs() <= 1e-6 * expected.abs().amax(1, keepdim=True)).all())
        assert torch.equal(y[rows // 2], fast(x[rows // 2 : rows // 2 + 1])[0])  # a row does not depend on the others
    exact = F.linear(x, linear.weight, linear.bias)  # and near the float32 layer: int8 weights, 1/127 steps
    assert bool(((fast(x) - exact).abs() <= 0.02 * exact.abs().amax(1, keepdim=True)).all())


@needs_kernel
def test_int8_kernel_largest_sums_and_bad_rows():
    """All weights +-127 (after rounding) and inputs at the largest level: the int32 sums must not overflow.
    A row holding NaN or infinity gives NaN in that row only; an all-zero row gives the bias."""
    linear = nn.Linear(2048, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([1.0, -1.0]).repeat(8)[:, None].expand(16, 2048))
        linear.bias.zero_()
    fast = Int8WeightLinear(linear)
    x = torch.full((4, 2048), 3.0)
    x[1, 5], x[2, 7], x[3] = float("nan"), float("inf"), 0.0
    y = fast(x)
    assert torch.equal(y[0], torch.tensor([6144.0, -6144.0]).repeat(8))
    assert bool(y[1:3].isnan().all()) and torch.equal(y[3], torch.zeros(16))
    with pytest.raises(SaticError, match="2048"):
        fast(torch.randn(1, 2047))


@needs_kernel
@pytest.mark.parametrize("beam", [1, 3])
def test_int8_decoding_equals_fp32_with_the_rounded_weights(beam, reference):
    """int8 changes the weights (and rounds activations to 14+ bits): decoding picks the words fp32 decoding of
    a model holding the rounded weights picks."""
    base, feats, masks = reference
    int8 = Decoder.prepare(base, "int8", compile=True)
    rounded = SATModel(base.config)
    rounded.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(int8.model.get_submodule(name).dequantized_weight())
    opts = DecodeOptions(beam_size=beam)
    expected = decode(prepare_for_inference(rounded, "fp32", kernel="torch"), feats, masks, opts)
    result = decode(int8, feats, masks, opts)
    assert torch.equal(result.seq, expected.seq)
    # the activations' rounding: ~1e-4
    torch.testing.assert_close(result.logprobs, expected.logprobs, atol=5e-4, rtol=0)


def test_the_int8_kernel_takes_inputs_while_they_keep_8_bits():
    """255 levels each side of 0 is the least the int8 kernel takes: 66310 inputs, and one more is refused."""
    assert activation_levels(66310) == 255
    with pytest.raises(SaticError, match=r"^the int8 kernel rounds inputs to fewer than 8 bits with 66311 input "
                                         r"features; use kernel='torch'$"):
        activation_levels(66311)


def test_an_all_zero_row_quantizes_to_zeros_with_scale_one():
    q, scale = quantize_rows(torch.tensor([[0.0, 0.0], [-2.54, 1.27]]))
    assert q.tolist() == [[0, 0], [-127, 64]] and scale.tolist() == pytest.approx([1.0, 0.02], rel=1e-6)


@pytest.mark.parametrize("layer", [SmallRowLinear, Int8WeightLinear])
def test_the_kernel_layers_refuse_weights_that_are_not_float32(layer):
    with pytest.raises(SaticError, match=r"^the small-row kernel is for float32 on the CPU, got torch.float64 on cpu; "
                                         r"use kernel='torch'$"):
        layer(nn.Linear(4, 3).double())


def test_swap_layers_replaces_every_linear_norm_and_attention_and_counts_them():
    torch.manual_seed(0)
    model = SATModel(ModelConfig(vocab_size=8, num_layers=1, d_model=16, d_ff=16, num_heads=2, att_feat_size=8))
    layers = sum(isinstance(m, (nn.Linear, LayerNorm)) for m in model.modules())
    int8 = copy.deepcopy(model)
    assert layers > 10 and swap_layers(model) == layers and swap_layers(int8, int8=True) == layers
    for swapped, linear in ((model, SmallRowLinear), (int8, Int8WeightLinear)):
        kinds = {type(m) for m in swapped.modules()}
        assert {linear, FusedReferenceNorm} <= kinds and not kinds & {nn.Linear, LayerNorm, SmallRowLinear} - {linear}
        attentions = [m for m in swapped.modules() if hasattr(m, "attend")]
        assert len(attentions) == 3 and all(m.attend is fused_attend for m in attentions)


def test_where_the_kernel_could_not_be_built_int8_layers_and_norms_compute_the_same_in_torch(monkeypatch):
    """The same int8 weights with float activations, and the model's own norm."""
    monkeypatch.setattr(small_gemm, "_ready", False)  # what a failed build leaves
    torch.manual_seed(0)
    linear, norm = nn.Linear(20, 37), LayerNorm(20)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 20)
    layer = Int8WeightLinear(linear)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t() + linear.bias, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0.02)
        assert torch.equal(FusedReferenceNorm(norm)(x), norm(x))
