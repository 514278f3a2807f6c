"""The model's building blocks where satic computes the reference's numbers faster: region packing
(row-wise layers skip padded regions), dropout masks from numpy's PCG64 on the CPU, and the
reference's LayerNorm with its row moments from torch's fused layer norm and a hand-written backward.
`transformer.py` uses them as it would torch's modules; each has an equivalence test against the
plain computation (tests/model, tests/training/test_training_speed_paths.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RegionPacking:
    """The valid regions of a padded batch as one (T, c) block, so that the row-wise layers (projections,
    feed-forward, norms) skip the padding; attention pads them back to (B, N, c) with a key mask."""

    def __init__(self, mask: Tensor) -> None:
        self.batch, self.length = mask.shape  # (B, N) bool, True for real regions
        self.index = mask.flatten().nonzero()[:, 0]  # (T,) positions in the flattened (B*N) layout

    def pack(self, x: Tensor) -> Tensor:
        """(B, N, c) -> (T, c)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """(T, c) -> (B, N, c), zeros at the padding."""
        out = x.new_zeros(self.batch * self.length, x.size(-1)).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, -1)


def keep_mask(shape: torch.Size, p: float) -> Tensor:
    """Float32 dropout mask on the CPU: 1 / (1 - p) with probability 1 - p (to 2^-32), else 0.

    The random bits come from numpy's PCG64, which fills them about twice as fast as torch's CPU
    generator; it is seeded with one draw from torch's generator, so torch's RNG state alone still
    fixes every mask (manual_seed, fork_rng and resumed runs behave as with nn.Dropout)."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))
    raw = np.random.PCG64(seed).random_raw((n + 1) // 2)  # (ceil(n/2),) uint64: two 32-bit draws each
    bits = torch.from_numpy(raw.view(np.int32)[:n]).view(shape)  # uniform over the int32 range
    threshold = -(2**31) + round(p * 2**32)
    return (bits >= threshold).to(torch.float32).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """Inverted dropout like nn.Dropout (keep probability 1 - p, kept values scaled by 1 / (1 - p)), with
    a cheaper mask on the CPU (`keep_mask`, a third of nn.Dropout's cost there); other devices keep
    torch's fused kernel."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return x * keep_mask(x.shape, self.p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def reference_norm(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., d) -> ((x - mean) / (unbiased std + eps), unbiased std (..., 1), std + eps (..., 1)).

    The row moments come from torch's fused layer norm (several times faster on the CPU than std_mean);
    its own eps of 1e-30 only keeps a constant row finite (0 rather than 0 * inf) and changes no other."""
    n = x.size(-1)
    normed, _, rstd = torch.native_layer_norm(x, (n,), None, None, 1e-30)  # (x - mean) / biased std
    biased = rstd.reciprocal()  # (..., 1)
    std = biased * math.sqrt(n / (n - 1))
    denom = std + eps
    return normed * (biased / denom).to(normed.dtype), std, denom  # CUDA gives float32 moments for bf16 rows


class _ReferenceLayerNorm(torch.autograd.Function):
    """The reference's norm with a hand-written backward: a few passes over the rows instead of
    autograd's chain through the standard deviation."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # norms run in float32 under autocast
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        xhat, std, denom = reference_norm(x, eps)
        ctx.save_for_backward(xhat, std, denom, weight)
        return torch.addcmul(bias, xhat, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        xhat, std, denom, weight = ctx.saved_tensors
        n = xhat.size(-1)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            g = grad * weight  # (..., d) gradient w.r.t. xhat
            dot = (g * xhat).sum(-1, keepdim=True)  # (..., 1)
            # d std / dx enters through coef; a zero std has zero gradient, as torch's std backward
            coef = torch.where(std > 0, dot * denom / ((n - 1) * std), torch.zeros_like(std))
            grad_x = (g - g.mean(-1, keepdim=True)).sub_(xhat * coef).div_(denom)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat).reshape(-1, n).sum(0)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, n).sum(0)
        return grad_x, grad_weight, grad_bias, None


class LayerNorm(nn.Module):
    """The reference's norm: gain * (x - mean) / (unbiased std + eps) + bias. Not torch's LayerNorm."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _ReferenceLayerNorm.apply(x, self.weight, self.bias, self.eps)
        return torch.addcmul(self.bias, reference_norm(x, self.eps)[0], self.weight)  # plain ops: traceable


class InferenceNorm(nn.Module):
    """A LayerNorm's weights and eps as buffers, for the fused inference norms that replace it (subclasses
    give forward)."""

    def __init__(self, norm: LayerNorm) -> None:
        super().__init__()
        self.register_buffer("weight", norm.weight.detach().clone())
        self.register_buffer("bias", norm.bias.detach().clone())
        self.eps = norm.eps
