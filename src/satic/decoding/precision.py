"""Opt-in reduced precision for inference: a batch-1 decoding step is bound by reading the weights,
so fewer bytes per weight is the main lever on CPU."""
from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from torch import nn

from satic.decoding.cache import enable_tracing
from satic.decoding.small_gemm import kernel_available, load_kernel, swap_linears
from satic.errors import SaticError
from satic.model.transformer import SATModel

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS = ("fp32", "bf16", "int8")
Kernel = Literal["auto", "small_gemm", "torch"]
KERNELS = ("auto", "small_gemm", "torch")


def prepare_for_inference(model: SATModel, precision: Precision = "fp32", trace: bool = False,
                          kernel: Kernel = "auto") -> SATModel:
    """An eval-mode copy of `model` for decoding: 'fp32' as is, 'bf16' all weights and activations in
    bfloat16 (log-probs still float32), 'int8' Linear weights quantized to int8 per tensor with
    activations quantized on the fly (torch dynamic quantization, fbgemm on x86). trace=True records
    each decoding step with TorchScript once per shape (seconds) and reuses it: much less per-step
    overhead, the main cost at batch 1 after the weights. kernel: fp32 linear layers on the CPU run up
    to 64 rows through satic's small-row kernel ('small_gemm'; built on first use), which reads each
    weight once per decoding step where torch's GEMM is 2-4x slower for 2..16 rows, and runs the
    encoder of one image about 1.5x faster; 'auto' uses it when it can be built (fp32 on the CPU),
    'torch' never. The original is left untouched; the copy is for decoding only (no training, no
    saving)."""
    if precision not in PRECISIONS:
        raise SaticError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if kernel not in KERNELS:
        raise SaticError(f"kernel {kernel!r} is not one of {list(KERNELS)}")
    fits_kernel = precision == "fp32" and model.positions.device.type == "cpu"
    if kernel == "small_gemm" and not (fits_kernel and kernel_available()):
        raise SaticError(f"kernel='small_gemm' needs fp32 on the CPU and a working C++ compiler "
                         f"({load_kernel() or 'the model is ' + precision + ' on ' + str(model.positions.device)}); "
                         "use kernel='auto' or 'torch'")
    if precision == "int8" and model.positions.device.type != "cpu":
        raise SaticError(f"int8 inference runs on the CPU only, but the model is on {model.positions.device}; "
                         "use precision='bf16' on a GPU")
    model = copy.deepcopy(model).eval()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "int8":
        with warnings.catch_warnings():  # the torch.ao API is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            try:
                from torch.ao.quantization import quantize_dynamic

                model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
            except (ImportError, RuntimeError) as err:
                raise SaticError(f"int8 inference is not available in this torch build ({err}); "
                                 "use precision='fp32' or 'bf16'") from err
    if kernel != "torch" and fits_kernel and kernel_available():
        swap_linears(model)
    if trace:
        enable_tracing(model)
    return model
