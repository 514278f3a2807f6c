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
