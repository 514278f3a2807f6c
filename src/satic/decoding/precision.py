"""Opt-in reduced precision for inference: a batch-1 decoding step is bound by reading the weights,
so fewer bytes per weight is the main lever on CPU."""
from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from torch import nn

from satic.decoding.cuda_graphs import CompiledReferenceNorm, compiler_available
from satic.decoding.small_gemm import build_problem, kernel_available, replace_modules, swap_layers
from satic.errors import SaticError
from satic.model.layers import LayerNorm
from satic.model.transformer import SATModel

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS = ("fp32", "bf16", "int8")
Kernel = Literal["auto", "small_gemm", "torch"]
KERNELS = ("auto", "small_gemm", "torch")


def dynamic_int8(model: SATModel) -> SATModel:
    """torch's dynamic quantization: int8 weights (per output channel) and activations (fbgemm)."""
    with warnings.catch_warnings():  # the torch.ao API is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        except (ImportError, RuntimeError) as err:
            raise SaticError(f"int8 inference is not available in this torch build ({err}); "
                             "use precision='fp32' or 'bf16'") from err


def prepare_for_inference(model: SATModel, precision: Precision = "fp32", kernel: Kernel = "auto") -> SATModel:
    """An eval-mode copy of `model` for decoding: 'fp32' as is, 'bf16' all weights and activations in
    bfloat16 (log-probs still float32), 'int8' Linear weights in int8 with one scale per output row.
    (`Decoder.prepare` calls this and records the decoding step on top.) kernel: on the CPU, satic's
    small-row kernel ('small_gemm'; built at the first decode, or ahead by `satic build-kernels`) runs the
    linear layers: fp32 up to 64 rows
    (it reads each weight once per decoding step where torch's GEMM is 2-4x slower for 2..16 rows, and
    runs one image's encoder ~1.5x faster), int8 at every size with int16 activations and exact integer
    sums (a quarter of the bytes per step, and fewer changed captions than rounding the activations to
    8 bits); the norms become one fused op each. On CUDA, 'auto' builds each norm as one kernel with
    torch.compile (when Triton is there). 'torch' uses torch's operators throughout, and for int8 its
    dynamic quantization (fbgemm; activations rounded to 8 bits too); 'auto' picks the kernel when it
    can be built. The original is left untouched; the copy is for decoding only (no training, no saving)."""
    if precision not in PRECISIONS:
        raise SaticError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if kernel not in KERNELS:
        raise SaticError(f"kernel {kernel!r} is not one of {list(KERNELS)}")
    fits_kernel = precision in ("fp32", "int8") and model.positions.device.type == "cpu"
    problem = build_problem() if fits_kernel and kernel != "torch" else None  # checks only: builds nothing
    if kernel == "small_gemm" and (problem or not fits_kernel):
        raise SaticError(f"kernel='small_gemm' needs fp32 or int8 on the CPU and a working C++ compiler "
                         f"({problem or 'the model is ' + precision + ' on ' + str(model.positions.device)}); "
                         "use kernel='auto' or 'torch'")
    if problem:
        kernel_available()  # the one warning that says why torch's layers are used
    if precision == "int8" and model.positions.device.type != "cpu":
        raise SaticError(f"int8 inference runs on the CPU only, but the model is on {model.positions.device}; "
                         "use precision='bf16' on a GPU")
    model = copy.deepcopy(model).eval()
    use_kernel = kernel != "torch" and fits_kernel and problem is None  # the layers build it at their first call
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "int8" and not use_kernel:
        model = dynamic_int8(model)
    if use_kernel:
        swap_layers(model, int8=precision == "int8")
    if kernel == "auto" and model.positions.device.type == "cuda" and compiler_available():
        replace_modules(model, lambda m: CompiledReferenceNorm(m) if isinstance(m, LayerNorm) else None)
    return model
