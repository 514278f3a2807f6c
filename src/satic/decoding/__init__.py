"""Decoding: a key/value cache, greedy, sampling, batched beam search, ensembles, reduced precision."""
from satic.decoding.cache import AutogradStepper, CachedStepper, RecomputeStepper, Stepper, enable_tracing, make_stepper
from satic.decoding.ensemble import Ensemble
from satic.decoding.options import DecodeOptions, DecodeResult
from satic.decoding.precision import PRECISIONS, prepare_for_inference
from satic.decoding.search import beam_search, decode, draw_logprobs, output_rows, sample, sequence_logprobs, start

__all__ = ["AutogradStepper", "CachedStepper", "RecomputeStepper", "Stepper", "enable_tracing", "make_stepper", "Ensemble", "DecodeOptions",
           "DecodeResult", "PRECISIONS", "prepare_for_inference", "beam_search", "decode", "draw_logprobs", "output_rows", "sample",
           "sequence_logprobs", "start"]
