"""The training-speed layers compute what torch's do: the CPU dropout mask and the LayerNorm backward."""
import torch

from satic.model.layers import Dropout, LayerNorm


def test_dropout_keeps_1_minus_p_and_scales_like_torch():
    drop = Dropout(0.1)
    x = torch.full((400, 500), 2.0, requires_grad=True)
    assert drop.eval()(x) is x
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = y != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0 / 0.9))
    assert abs(kept.float().mean().item() - 0.9) < 3e-3  # 200k draws: 6 standard deviations
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)


def _plain_norm(x, weight, bias):
    std, mean = torch.std_mean(x, -1, keepdim=True)
    return weight * (x - mean) / (std + 1e-6) + bias


def test_layernorm_backward_equals_autograd_of_the_reference_formula():
    torch.manual_seed(0)
    norm = LayerNorm(9).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    grad = torch.randn(2, 3, 9, dtype=torch.float64)
    got = torch.autograd.grad(norm(x), (x, norm.weight, norm.bias), grad)
    expected = torch.autograd.grad(_plain_norm(x, norm.weight, norm.bias), (x, norm.weight, norm.bias), grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)
    constant = torch.full((1, 9), 3.0, dtype=torch.float64, requires_grad=True)  # zero std: finite, as torch's
    torch.testing.assert_close(norm(constant), norm.bias.detach()[None])
    assert bool(torch.isfinite(torch.autograd.grad(norm(constant).sum(), constant)[0]).all())
