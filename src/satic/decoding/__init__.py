"""Decoding: the decoder engine and its key/value cache, greedy, sampling, batched beam search,
ensembles, reduced precision."""
from satic.decoding.cache import KVCache, RecomputeStepper, Stepper
from satic.decoding.engine import Decoder, DecodeState
from satic.decoding.ensemble import Ensemble
from satic.decoding.options import DecodeOptions, DecodeResult
from satic.decoding.precision import PRECISIONS, prepare_for_inference
from satic.decoding.search import beam_search, decode, draw_logprobs, output_rows, sample, sequence_logprobs, start

__all__ = ["KVCache", "RecomputeStepper", "Stepper", "Decoder", "DecodeState", "Ensemble", "DecodeOptions",
           "DecodeResult", "PRECISIONS", "prepare_for_inference", "beam_search", "decode", "draw_logprobs",
           "output_rows", "sample", "sequence_logprobs", "start"]
