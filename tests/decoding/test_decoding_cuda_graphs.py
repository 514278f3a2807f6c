"""CUDA graphs of the decoding step and encoder (run where a GPU is; skipped elsewhere)."""
import pytest
import torch

from satic.decoding import DecodeOptions, Decoder, Ensemble, decode, prepare_for_inference
from satic.decoding.cuda_graphs import CompiledReferenceNorm, compiler_available
from satic.model import ModelConfig, SATModel
from satic.model.layers import LayerNorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def recordings(decoder: Decoder) -> tuple[int, int]:
    """(encoder graphs, step graphs) recorded by a decoder."""
    return decoder.recordings()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_graphed_decoding_equals_eager(k, beam, masked, sat, data):
    feats, masks = (t.cuda() for t in data)
    if not masked:  # every image with all 50 regions: the encoder is recorded too
        feats, masks = feats + 0.1 * torch.randn_like(feats), None
    eager = prepare_for_inference(sat(k).cuda())
    graphed = Decoder.prepare(sat(k).cuda(), compile=True)
    opts = DecodeOptions(beam_size=beam)
    for shift in (0.0, 0.5):  # the second decode replays the recordings on other images
        inputs = feats + shift
        expected = decode(eager, inputs, masks, opts)
        result = decode(graphed, inputs, masks, opts)
        assert torch.equal(result.seq, expected.seq)
        torch.testing.assert_close(result.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    assert recordings(graphed) == (0 if masked else 1, 1)


def test_graphed_batches_equal_one_image_at_a_time(sat, data):
    feats, masks = (t.cuda() for t in data)
    graphed = Decoder.prepare(sat(2).cuda(), compile=True)
    opts = DecodeOptions(beam_size=3)
    batched = decode(graphed, feats, masks, opts).seq
    singles = [decode(graphed, feats[i:i + 1, :int(masks[i].sum())], None, opts).seq for i in range(feats.size(0))]
    assert torch.equal(batched, torch.cat(singles))


def test_two_live_decodes_of_one_model_use_separate_graphs(sat, data):
    feats, masks = (t.cuda() for t in data)
    model = Decoder.prepare(sat(2).cuda(), compile=True)
    opts = DecodeOptions(beam_size=2)
    alone = decode(model, feats, masks, opts)
    together = decode(Ensemble([model, model]), feats, masks, opts)
    assert torch.equal(together.seq, alone.seq)
    assert recordings(model)[1] == 2


def test_bf16_graphs_equal_bf16_eager(sat, data):
    feats = data[0][:, :48].cuda()  # unmasked, a whole region bucket: both run the same bf16 products
    opts = DecodeOptions(beam_size=3)
    expected = decode(prepare_for_inference(sat(2).cuda(), "bf16"), feats, None, opts)
    result = decode(Decoder.prepare(sat(2).cuda(), "bf16", compile=True), feats, None, opts)
    assert torch.equal(result.seq, expected.seq)
    torch.testing.assert_close(result.logprobs, expected.logprobs, atol=1e-5, rtol=0)


@pytest.mark.skipif(not compiler_available(), reason="torch.compile has no Triton here")
def test_compiled_norm_equals_the_model_norm():
    norm = LayerNorm(512).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        compiled = CompiledReferenceNorm(norm)
        for shape in [(1, 1, 512), (3, 2, 512), (36, 512)]:
            x = torch.randn(shape, device="cuda")
            x[0] = 0.5  # a constant row: zero deviation
            torch.testing.assert_close(compiled(x), norm(x), atol=1e-5, rtol=1e-5)
        x = torch.randn(4, 2, 512, device="cuda", dtype=torch.bfloat16)
        bf16 = CompiledReferenceNorm(norm.to(torch.bfloat16))
        torch.testing.assert_close(bf16(x).float(), norm(x).float(), atol=0.05, rtol=0.02)
    model = prepare_for_inference(SATModel(ModelConfig(vocab_size=20, num_layers=1, d_model=64, d_ff=128,
                                                       att_feat_size=16)).cuda())
    assert not any(isinstance(m, LayerNorm) for m in model.modules())
