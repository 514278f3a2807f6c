import dataclasses

import pytest
import torch

from satic.model import SATModel


@pytest.fixture(scope="package")
def reference(reference_sat):
    """The fixture's small model (random weights tuned so captions end at varied lengths) and features."""
    feats = reference_sat.features
    return reference_sat(1), torch.from_numpy(feats["att_feats_padded"]), torch.from_numpy(feats["att_masks"]) > 0


@pytest.fixture
def sat(reference):
    """sat(k, seed=None): the fixture's weights with group size k; a seed perturbs them (another model)."""
    def make(k: int, seed: int | None = None) -> SATModel:
        base = reference[0]
        model = SATModel(dataclasses.replace(base.config, group_size=k))
        model.load_state_dict(base.state_dict())
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model.eval()
    return make


@pytest.fixture
def data(reference):
    return reference[1], reference[2]


@pytest.fixture
def tiny_model():
    """make(k, eos_bias, vocab=8, seed=0): a 1-layer, d_model 32 model with 8-dim features and its end-of-caption
    logit biased by eos_bias (large negative: captions run to max_length)."""
    from satic.model import ModelConfig

    def make(k: int, eos_bias: float, vocab: int = 8, seed: int = 0) -> SATModel:
        torch.manual_seed(seed)
        model = SATModel(ModelConfig(vocab_size=vocab, group_size=k, num_layers=1, d_model=32, d_ff=32, num_heads=2,
                                     att_feat_size=8, max_positions=32)).eval()
        with torch.no_grad():
            model.generator.bias[0] = eos_bias
        return model

    return make
