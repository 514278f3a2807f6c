import numpy as np
import pytest
import torch

from satic.model.reference import load_reference_state_dict, model_from_reference, read_reference_infos


@pytest.fixture(scope="package")
def reference(reference_fixture):
    """The fixture's small model (random weights tuned so captions end at varied lengths) and features."""
    state = load_reference_state_dict(reference_fixture / "model-best.pth")
    infos = read_reference_infos(reference_fixture / "K1" / "infos_sat-k1-fixture-best.pkl")
    model, _, _ = model_from_reference(state, infos)
    feats = np.load(reference_fixture / "features.npz")
    return model, torch.from_numpy(feats["att_feats_padded"]), torch.from_numpy(feats["att_masks"]) > 0
