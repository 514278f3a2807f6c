import numpy as np
import pytest
import torch

from satic.decoding import sequence_logprobs
from satic.errors import SaticError
from satic.model import ModelConfig, SATModel
from satic.model.layers import Dropout, LayerNorm
from satic.model.transformer import attend, block_mask, training_mask


def tiny(k: int = 1, **kw) -> SATModel:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=12, group_size=k, num_layers=2, d_model=16, d_ff=32, num_heads=4,
                         att_feat_size=6, **kw)
    return SATModel(config).eval()


@pytest.mark.parametrize("bad", [dict(num_heads=5), dict(vocab_size=0), dict(dropout=1.0), dict(group_size=0),
                                 dict(d_model=15, num_heads=5), dict(num_layers=True)])
def test_config_rejects_bad_values(bad):
    args = dict(vocab_size=10, d_model=16, num_heads=4) | bad
    with pytest.raises(ValueError):
        ModelConfig(**args)


def test_k1_uses_exactly_the_causal_mask():
    assert torch.equal(block_mask(7, 1), torch.ones(7, 7).tril().bool())
    tokens = torch.tensor([[0, 3, 4, 5, 6]])
    assert torch.equal(training_mask(tokens, 1)[0], torch.ones(5, 5).tril().bool())


def test_block_mask_k2_and_training_padding_rule():
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]]).bool()
    assert torch.equal(block_mask(5, 2), expected)
    # zero tokens are hidden as keys, except position 0
    tokens = torch.tensor([[0, 0, 7, 8, 0]])
    masked = expected.clone()
    masked[:, 1] = False
    masked[:, 4] = False
    assert torch.equal(training_mask(tokens, 2)[0], masked)


def test_layernorm_is_the_references_unbiased_std_plus_eps():
    norm = LayerNorm(5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2, 3, 4, 5]))
        norm.bias.copy_(torch.tensor([0.5, 0, 0, 0, -1]))
    x = torch.randn(3, 5)
    xn = x.double().numpy()
    expected = norm.weight.detach().double().numpy() * (xn - xn.mean(-1, keepdims=True)) / (
        xn.std(-1, ddof=1, keepdims=True) + 1e-6) + norm.bias.detach().double().numpy()
    np.testing.assert_allclose(norm(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_training_output_p_sees_only_words_before_its_group(k):
    """Output p predicts labels[p+1] = seq[p+1] from seq[0 .. (p // K) * K] only; as in the reference, the
    decoder input is cut to a multiple of K minus one, so a partial last group misses its last word."""
    model = tiny(k)
    feats = torch.randn(1, 4, 6)
    seq = torch.tensor([[0, 3, 4, 5, 6, 7, 8, 9]])  # labels[:, :-1], no inner zeros
    base = model(feats, None, seq)
    assert base.shape == (1, 8, 13)
    decoder_len = (seq.size(1) + k) // k * k - 1
    for j in range(1, seq.size(1)):
        changed = seq.clone()
        changed[0, j] = 11
        diff = (model(feats, None, changed) - base).abs().amax(-1)[0]  # (L+1,)
        for p in range(seq.size(1)):
            sees = (p // k) * k >= j and j + k - 1 < decoder_len
            assert bool(diff[p] > 1e-6) == sees, (j, p)


def test_k1_training_pass_equals_inference_pass_without_padding():
    model = tiny(1)
    feats = torch.randn(2, 5, 6)
    labels = torch.tensor([[0, 3, 4, 5, 6, 0], [0, 7, 8, 9, 10, 0]])
    logprobs = model(feats, None, labels[:, :-1])
    chosen = logprobs.gather(2, labels[:, 1:, None])[..., 0]
    expected = sequence_logprobs(model, feats, None, labels[:, 1:])
    torch.testing.assert_close(chosen, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("check", ["outputs", "gradients"])
def test_a_padded_batch_equals_each_image_alone(check):
    """A padded batch (packed encoder regions, per-image cross-attention, an image's captions sharing its
    memory) gives the log-probs and the gradients of each image alone, without padding."""
    model = tiny(2)
    feats = torch.randn(2, 5, 6)
    masks = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    seq = torch.randint(1, 13, (6, 9))
    seq[:, 0] = 0

    def alone(b: int) -> torch.Tensor:
        return model(feats[b : b + 1, : masks[b].sum()], None, seq[3 * b : 3 * b + 3])

    if check == "outputs":
        together = model(feats, masks, seq)
        for b in range(2):
            torch.testing.assert_close(together[3 * b : 3 * b + 3], alone(b), atol=1e-5, rtol=0)
        return
    model(feats, masks, seq).sum().backward()
    together = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for b in range(2):
        alone(b).sum().backward()
    for p, g in zip(model.parameters(), together, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-5)


def test_padding_regions_do_not_change_the_output():
    model = tiny(2)
    feats = torch.randn(1, 3, 6)
    padded = torch.cat([feats, torch.randn(1, 4, 6) * 100], 1)
    masks = torch.tensor([[1, 1, 1, 0, 0, 0, 0]]).bool()
    seq = torch.tensor([[0, 3, 4, 5]])
    torch.testing.assert_close(model(padded, masks, seq), model(feats, None, seq), atol=1e-5, rtol=0)
    memory, bias = model.encode(padded, masks)  # the trailing padding cropped, as the reference's clip_att
    assert memory.shape == (1, 3, 16) and bias.shape == (1, 1, 1, 3)


def test_attention_on_the_cpu_is_the_references_order_of_operations_bit_for_bit():
    # scores, scale, mask, softmax, values, one after another as the reference; torch's fused attention computes
    # the same function with other rounding, kept for the GPU
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    bias = torch.zeros(2, 1, 1, 7).masked_fill_(torch.rand(2, 1, 1, 7) < 0.3, -1e9)
    scores = torch.matmul(q, k.transpose(-2, -1)) / 8**0.5 + bias
    expected = torch.matmul(torch.softmax(scores, dim=-1), v)
    assert torch.equal(attend(q, k, v, bias, Dropout(0.0)), expected)
    assert torch.equal(attend(q, k, v, None, Dropout(0.0)),
                       torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / 8**0.5, dim=-1), v))


def test_bad_features_give_clear_errors():
    model = tiny(1)
    seq = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(SaticError, match="expects"):
        model(torch.randn(1, 4, 7), None, seq)
    bad = torch.randn(1, 4, 6)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(SaticError, match="NaN"):
        model(bad, None, seq)
    with pytest.raises(SaticError, match="no valid region"):
        model(torch.randn(1, 4, 6), torch.zeros(1, 4, dtype=torch.bool), seq)
    with pytest.raises(SaticError, match="divide"):
        model(torch.randn(2, 4, 6), None, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(SaticError, match=r"shape \(4, 6\) but this model expects \(batch, regions, 6\)"):
        model.check_features(torch.randn(4, 6), None)  # the right size, without the batch dimension
    with pytest.raises(SaticError, match="no regions; every image needs at least one region"):
        model.check_features(torch.randn(2, 0, 6), None)
    bad = torch.randn(1, 4, 6)
    bad[0, 3, 5] = -float("inf")
    with pytest.raises(SaticError, match="NaN or infinite"):
        model.check_features(bad, None)
    with pytest.raises(SaticError, match=r"region mask has shape \(1, 3\) but the features have \(1, 4\)"):
        model.check_features(torch.randn(1, 4, 6), torch.ones(1, 3, dtype=torch.bool))
    model.check_features(torch.randn(0, 4, 6), None)  # no images: nothing to refuse
    model.check_features(torch.randn(1, 1, 6), None)  # one region is enough


def test_positions_beyond_the_table_are_refused():
    model = tiny(1, max_positions=6)
    with pytest.raises(SaticError, match="max_positions"):
        model(torch.randn(1, 3, 6), None, torch.zeros(1, 7, dtype=torch.long))


def test_positions_up_to_the_table_size_are_accepted():
    model = tiny(1, max_positions=6)
    feats = torch.randn(1, 3, 6)
    seq = torch.tensor([[0, 3, 4, 5, 6, 7]])  # exactly max_positions decoder positions
    assert model(feats, None, seq).shape == (1, 6, 13)
    assert model.embed_words(seq).shape == (1, 6, 16)


def test_projections_start_with_the_reference_xavier_bound_per_block():
    # The reference's attention has a separate d x d Linear per query, key and value, each Xavier-initialised;
    # satic's fused qkv (3d x d) and kv (2d x d) must give every block that bound, sqrt(6 / 2d), and its spread.
    torch.manual_seed(0)
    d = 64
    model = SATModel(ModelConfig(vocab_size=20, att_feat_size=16, d_model=d, num_layers=1, num_heads=4, d_ff=128))
    bound = (6 / (2 * d)) ** 0.5
    blocks = {"encoder_layers.0.attn.qkv.weight": 3, "decoder_layers.0.self_attn.qkv.weight": 3,
              "decoder_layers.0.cross_attn.kv.weight": 2, "decoder_layers.0.cross_attn.q.weight": 1,
              "decoder_layers.0.self_attn.out.weight": 1}
    params = dict(model.named_parameters())
    for name, count in blocks.items():
        assert params[name].shape == (count * d, d)
        for block in params[name].detach().split(d):
            assert 0.99 * bound < block.abs().max() <= bound, name
            assert block.std().item() == pytest.approx(bound / 3**0.5, rel=0.05), name
    # the feed-forward and output matrices keep their own shapes' bounds; biases keep nn.Linear's, and so does
    # the region embedding, as in the reference (1 / sqrt(16) here, under Xavier's sqrt(6 / 80))
    region = params["region_embed.weight"].detach()
    assert 0.99 / 16**0.5 < region.abs().max() <= 1 / 16**0.5
    assert params["decoder_layers.0.ffn.w1.weight"].abs().max() <= (6 / (d + 128)) ** 0.5
    assert params["decoder_layers.0.self_attn.qkv.bias"].abs().max() <= 1 / d**0.5
