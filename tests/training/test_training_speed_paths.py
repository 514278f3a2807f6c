"""The training fast paths compute what the plain ones do: scoring drawn words only up to the last step
the sampler ran, the sampling pass against a parallel one, per-image cross-attention. (Packed encoder
regions: tests/model/test_model_transformer.py; the CPU dropout mask and the LayerNorm backward:
tests/model/test_model_layers.py.)"""
import pytest
import torch

from satic.decoding import DecodeOptions, draw_logprobs, output_rows
from satic.model import ModelConfig, SATModel
from satic.model.transformer import block_mask, mask_bias
from satic.training.trainer import Objective


def _model(k: int) -> SATModel:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=12, group_size=k, num_layers=2, d_model=16, d_ff=32, num_heads=4, att_feat_size=6)
    return SATModel(config).eval()


def test_draw_logprobs_score_only_the_steps_the_loop_ran():
    """The parallel pass covers the steps up to the longest row's finishing group, no more: what a pass
    over every position gives there, and 0 after (the sampling loop stopped once all rows were finished)."""
    model = _model(2)
    feats = torch.randn(2, 5, 6)
    draws = torch.tensor([[3, 4, 5, 0, 7, 8, 0, 0], [6, 0, 2, 2, 0, 0, 0, 0],
                          [7, 8, 9, 10, 0, 2, 0, 0], [1, 1, 0, 5, 0, 0, 0, 0]])
    got = draw_logprobs(model, feats, None, draws)
    assert bool((got[:, 6:] == 0).all()) and bool((got[:, :6] != 0).all())
    seq = output_rows(draws, 2)
    assert seq.tolist()[0] == [3, 4, 5, 0, 0, 0, 0, 0] and seq.tolist()[1] == [6, 0, 0, 0, 0, 0, 0, 0]
    tokens = torch.cat([torch.zeros(4, 2, dtype=torch.long), seq[:, :6]], 1)
    memory, bias = model.encode(feats)
    full = model.logprobs(model.decode(tokens, model.memory_kv(memory), bias,
                                       mask_bias(block_mask(8, 2), torch.float32)))  # (R, 8, V+1)
    torch.testing.assert_close(got[:, :6], full.gather(2, draws[..., None])[:, :6, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_objective_sampling_pass_and_parallel_scoring_agree(k):
    """Without dropout, backpropagating through the sampling pass (the trainer's default) and scoring
    the same draws in one parallel pass (scst.logprobs=rescore) give the same log-probs and gradients."""
    model = _model(k)
    feats = torch.randn(2, 5, 6)
    masks = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    options = DecodeOptions(sample_method="sample", sample_n=3, max_length=10)
    seq, draws, sampled = Objective(model)(feats, masks, mode="sample", sampling=options,
                                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(seq, output_rows(draws, k))
    weights = torch.randn(seq.shape)
    (sampled * weights).sum().backward()
    sampled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scored = Objective(model)(feats, masks, draws, mode="score")
    (scored * weights).sum().backward()
    torch.testing.assert_close(scored, sampled, atol=1e-6, rtol=0)
    for p, g in zip(model.parameters(), sampled_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_memory_kv_of_valid_regions_only_decodes_the_same():
    model = _model(2)
    feats = torch.randn(2, 5, 6)
    masks = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    memory, bias = model.encode(feats, masks)
    packed, full = model.memory_kv(memory, bias), model.memory_kv(memory)
    for (pk, pv), (fk, fv) in zip(packed, full, strict=True):
        torch.testing.assert_close(pk[0, :, :3], fk[0, :, :3])
        assert bool((pk[0, :, 3:] == 0).all())
        torch.testing.assert_close(pv[1], fv[1])
    tokens = torch.randint(0, 13, (4, 6))
    self_bias = torch.zeros(6, 6)
    torch.testing.assert_close(model.decode(tokens, packed, bias, self_bias),
                               model.decode(tokens, full, bias, self_bias))
