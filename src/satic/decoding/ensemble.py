"""Ensemble decoding: several models with the same K and vocabulary, probabilities averaged (the
reference's eval_ensemble: log of the weighted mean of the models' softmax outputs)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from satic.decoding.cache import Stepper
from satic.decoding.engine import Decoder
from satic.errors import SaticError
from satic.model.transformer import SATModel


class Ensemble:
    """Models (or Decoders, which keep their recorded steps) decoded together."""

    def __init__(self, models: Sequence[SATModel | Decoder], weights: Sequence[float] | None = None) -> None:
        if not models:
            raise SaticError("an ensemble needs at least one model")
        first = models[0].config
        for i, model in enumerate(models[1:], start=1):
            c = model.config
            if (c.group_size, c.vocab_size, c.att_feat_size) != (first.group_size, first.vocab_size, first.att_feat_size):
                raise SaticError(f"ensemble model {i} has K={c.group_size}, {c.vocab_size} words, features "
                                 f"{c.att_feat_size}; model 0 has K={first.group_size}, {first.vocab_size} words, "
                                 f"features {first.att_feat_size}; ensemble only models that agree on all three")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(weights) != len(models) or any(not 0 < w < math.inf for w in weights):
            raise SaticError(f"ensemble weights {weights} must be {len(models)} positive finite numbers")
        self.models = list(models)
        self.weights = weights
        self.config = first


class EnsembleStepper:
    def __init__(self, steppers: Sequence[Stepper], weights: Sequence[float]) -> None:
        self.steppers = list(steppers)
        self.group_size = self.steppers[0].group_size
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def step(self, tokens: Tensor) -> Tensor:
        probs = torch.stack([s.step(tokens).exp() for s in self.steppers], -1)  # (R, K, V+1, M)
        weights = self.weights.to(probs.device)
        return probs.mul(weights).div(weights.sum()).sum(-1).log()

    def reorder(self, index: Tensor) -> None:
        for s in self.steppers:
            s.reorder(index)
