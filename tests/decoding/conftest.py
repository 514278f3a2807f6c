import dataclasses

import numpy as np
import pytest
import torch

from satic.model import SATModel
from satic.model.reference import load_reference_state_dict, model_from_reference, read_reference_infos


@pytest.fixture(scope="package")
def reference(reference_fixture):
    """The fixture's small model (random weights tuned so captions end at varied lengths) and features."""
    state = load_reference_state_dict(reference_fixture / "model-best.pth")
    infos = read_reference_infos(reference_fixture / "K1" / "infos_sat-k1-fixture-best.pkl")
    model, _, _ = model_from_reference(state, infos)
    feats = np.load(reference_fixture / "features.npz")
    return model, torch.from_numpy(feats["att_feats_padded"]), torch.from_numpy(feats["att_masks"]) > 0


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
