"""Cross-entropy training as the reference trains: its teacher-forced log-probs and loss (fixture xe.npz),
for every K, with an image's caption rows sharing its encoder pass."""
import numpy as np
import pytest
import torch

from satic.training.losses import cross_entropy, token_kl

GROUP_SIZES = (1, 2, 4)


@pytest.mark.parametrize("k", GROUP_SIZES)
def test_teacher_forced_logprobs_and_loss_equal_the_reference(reference_sat, reference_fixture, k):
    """The reference repeats every image's regions for its 2 caption rows; satic encodes each image once.
    K>1 adds its leading pads, block mask and cut exactly as the reference's _forward."""
    model, feats, xe = reference_sat(k), reference_sat.features, np.load(reference_fixture / "xe.npz")
    labels, masks = torch.from_numpy(xe["labels"]), torch.from_numpy(xe["masks"])  # (12, 18)
    att = torch.from_numpy(feats["att_feats_padded"])  # (6, 50, 32): 2 caption rows per image
    att_masks = torch.from_numpy(feats["att_masks"]) > 0
    with torch.no_grad():
        logprobs = model(att, att_masks, labels[:, :-1])  # (12, 17, 31)
    expected = torch.from_numpy(xe[f"K{k}_logprobs"])
    assert logprobs.shape == expected.shape
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-5)  # every position, padding included
    total, count = cross_entropy(logprobs, labels[:, 1:], masks[:, 1:])
    assert (total / count).item() == pytest.approx(float(xe[f"K{k}_loss"]), rel=1e-6)
    total, count = cross_entropy(logprobs, labels[:, 1:], masks[:, 1:], smoothing=0.1)  # LabelSmoothing(0.1)
    assert (total / count).item() == pytest.approx(float(xe[f"K{k}_loss_smoothing_0.1"]), rel=1e-6)


@pytest.mark.parametrize("k", (2, 4))
def test_token_kd_loss_equals_the_references_loss_wrapper(reference_sat, reference_fixture, k):
    """The reference's LossWrapper with kd_weight 0.5 and the K=1 model as teacher: XE + 0.5 KLDivLoss
    ('batchmean' over the counted positions), the same normalisation as satic's."""
    xe = np.load(reference_fixture / "xe.npz")
    labels, masks = torch.from_numpy(xe["labels"]), torch.from_numpy(xe["masks"])
    feats = reference_sat.features
    att, att_masks = torch.from_numpy(feats["att_feats_padded"]), torch.from_numpy(feats["att_masks"]) > 0
    with torch.no_grad():
        student = reference_sat(k)(att, att_masks, labels[:, :-1])
        teacher = reference_sat(1)(att, att_masks, labels[:, :-1])
    total, count = cross_entropy(student, labels[:, 1:], masks[:, 1:])
    kl, _ = token_kl(student, teacher, masks[:, 1:])
    assert ((total + 0.5 * kl) / count).item() == pytest.approx(float(xe[f"K{k}_kd_0.5_loss"]), rel=1e-6)

