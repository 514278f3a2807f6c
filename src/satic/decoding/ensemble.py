"""Ensemble decoding: several models with the same K and vocabulary, probabilities averaged (the
reference's eval_ensemble: log of the weighted mean of the models' softmax outputs)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from satic.decoding.cache import KVCache, Stepper
from satic.decoding.engine import DecodeState, Decoder
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
            shape = (first.group_size, first.vocab_size, first.att_feat_size)
            if (c.group_size, c.vocab_size, c.att_feat_size) != shape:
                raise SaticError(f"ensemble model {i} has K={c.group_size}, {c.vocab_size} words, features "
                                 f"{c.att_feat_size}; model 0 has K={first.group_size}, {first.vocab_size} words, "
                                 f"features {first.att_feat_size}; ensemble only models that agree on all three")
        try:
            weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        except (TypeError, ValueError):
            raise SaticError(f"ensemble weights {weights!r} must be {len(models)} positive finite numbers, "
                             "one per checkpoint") from None
        if len(weights) != len(models) or any(not 0 < w < math.inf for w in weights):
            raise SaticError(f"ensemble weights {weights} must be {len(models)} positive finite numbers")
        # the steps mix the weights scaled so the largest is in [0.5, 1), in float32 (EnsembleStepper)
        exponent = math.frexp(max(weights))[1]
        if any(torch.tensor(math.ldexp(w, -exponent), dtype=torch.float32) == 0 for w in weights):
            raise SaticError(f"ensemble weights {weights}: {min(weights):g} is too small next to {max(weights):g} "
                             "(their ratio is below float32's smallest number, so that checkpoint would count for "
                             "nothing); give weights closer together, or leave that checkpoint out")
        self.models = list(models)
        self.weights = weights
        self.config = first


class EnsembleStepper:
    """The members' steppers over the same images, stepped and reordered together, each step the log of the
    members' probabilities' weighted mean. Where every member is a DecodeState of the native step, the mean
    is the native one (`csrc/decoder.cpp`), and `search` runs greedy decoding and beam search over all the
    members in one native call (`native_sample`, `native_beam_search`), to the same numbers."""

    def __init__(self, steppers: Sequence[Stepper], weights: Sequence[float]) -> None:
        self.steppers = list(steppers)
        self.group_size = self.steppers[0].group_size
        # scaled by the power of two that brings the largest into [0.5, 1): exact, so the mixture is the same to
        # the bit as with the weights as given, but float32 holds weights of 1e308 or 1e-320 and their sum
        exponent = math.frexp(max(float(w) for w in weights))[1]
        self.mix = [math.ldexp(float(w), -exponent) for w in weights]
        self.weights = torch.tensor(self.mix, dtype=torch.float32)
        # members that could run the native loops mix natively too, so that their loops equal this one
        states = self.native_states()
        self.native = states is not None and all(
            isinstance(s.cache, KVCache) and s.decoder._native_step_weights(s.cache.kv[0]) is not None for s in states)

    def step(self, tokens: Tensor) -> Tensor:
        logprobs = [s.step(tokens) for s in self.steppers]
        if len(logprobs) == 1:  # its own distribution (as the native loops take one model)
            return logprobs[0]
        if self.native:
            return torch.ops.satic_small_gemm.mix_logprobs(logprobs, self.mix)
        probs = torch.stack([lp.exp() for lp in logprobs], -1)  # (R, K, V+1, M)
        weights = self.weights.to(probs.device)
        return probs.mul(weights).div(weights.sum()).sum(-1).log()

    def native_states(self) -> list[DecodeState] | None:
        """The members' states, where every member is a DecodeState (else None)."""
        return self.steppers if all(isinstance(s, DecodeState) for s in self.steppers) else None

    def reorder(self, index: Tensor) -> None:
        for s in self.steppers:
            s.reorder(index)
