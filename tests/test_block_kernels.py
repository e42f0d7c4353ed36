"""The transformer block's fast ops (LayerNorm, bias + GELU, drop-path + residual) under the Triton
interpreter, against float64 references: odd widths, single rows, float32 and bf16 storage, grads.

Tolerances: float32 within 1e-5 relative of float64 (outputs and grads; the weight/bias grads are
sums over rows, taken relative to their largest value). bf16 outputs: the error against float64 at
most 2x what PyTorch's own bf16 op makes (its unit roundoff u when it rounds once; the interpreter
truncates where CUDA rounds to nearest, so its single rounding costs up to 2u), and never above 4u.
"""
import pytest
import torch
import torch.nn.functional as F

from bestrq2.kernels import (bias_gelu, bias_gelu_ref, layer_norm, layer_norm_ref, residual_drop_path,
                             residual_drop_path_ref)


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("BESTRQ2_KERNELS", "triton")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bf16_ok(kernel, torch_bf16, exact):
    u = torch.finfo(torch.bfloat16).eps / 2
    nz = exact.abs() > 1e-3
    e_k = float(((kernel.double() - exact).abs()[nz] / exact.abs()[nz]).max())
    e_t = float(((torch_bf16.double() - exact).abs()[nz] / exact.abs()[nz]).max())
    return e_k <= max(2 * e_t, 2 * u) * 1.0001 and e_k <= 4 * u, (e_k, e_t)


SHAPES = [(1, 7), (5, 33), (3, 40, 192), (2, 17, 768)]


# ---------------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_float32_against_float64(triton_path, shape):
    d = shape[-1]
    x = (torch.randn(shape) * 3 + 1.5).requires_grad_()
    w, b = (torch.randn(d) + 1).requires_grad_(), torch.randn(d).requires_grad_()
    y = layer_norm(x, w, b)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.layer_norm(x64, (d,), w64, b64, 1e-5)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel(y, y64) < 1e-5
    g = torch.randn_like(y64)
    grads = torch.autograd.grad(y, (x, w, b), g.float())
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), g)
    for name, a, e in zip(("x", "weight", "bias"), grads, grads64):
        assert a.dtype == torch.float32 and rel(a, e) < 1e-5, name
    torch.testing.assert_close(layer_norm_ref(x, w, b), y, rtol=1e-5, atol=1e-5)


def test_layer_norm_bf16_input_and_output_in_the_autocast_dtype(triton_path):
    x = torch.randn(64, 768) * 2
    xb = x.bfloat16()
    w, b = torch.randn(768) + 1, torch.randn(768)
    exact = F.layer_norm(xb.double(), (768,), w.double(), b.double(), 1e-5)
    y = layer_norm(xb, w, b)  # x's dtype outside autocast
    assert y.dtype == torch.bfloat16
    ok, errs = bf16_ok(y, F.layer_norm(xb.float(), (768,), w, b).bfloat16(), exact)
    assert ok, errs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer_norm(x, w, b).dtype == torch.bfloat16  # fp32 input, the matmul's dtype out
    assert layer_norm(x, w, b, out_dtype=torch.float32).dtype == torch.float32


def test_layer_norm_constant_rows_and_errors(triton_path):
    x = torch.full((3, 16), 4.0)  # zero variance: y = bias, as torch
    w, b = torch.ones(16), torch.arange(16.0)
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (16,), w, b))
    with pytest.raises(ValueError, match="weight and bias must be"):
        layer_norm(x, torch.ones(15), b)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, b, eps=0.0)


# ---------------------------------------------------------------------------------- bias + gelu
@pytest.mark.parametrize("shape", SHAPES + [(4, 3072)])
def test_bias_gelu_float32_against_float64(triton_path, shape):
    h = shape[-1]
    x = (torch.randn(shape) * 2).requires_grad_()
    bias = torch.randn(h).requires_grad_()
    y = bias_gelu(x, bias)
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = F.gelu(x64 + b64)
    assert y.dtype == torch.float32 and rel(y, y64) < 1e-5
    g = torch.randn_like(y64)
    (gx, gb), (gx64, gb64) = torch.autograd.grad(y, (x, bias), g.float()), torch.autograd.grad(y64, (x64, b64), g)
    assert rel(gx, gx64) < 1e-5 and rel(gb, gb64) < 1e-5
    assert gb.dtype == torch.float32 and gb.shape == (h,)
    torch.testing.assert_close(bias_gelu_ref(x, bias), y, rtol=1e-5, atol=1e-5)


def test_bias_gelu_bf16(triton_path):
    x = (torch.randn(128, 3072) * 2).bfloat16()
    bias = torch.randn(3072)
    exact = F.gelu(x.double() + bias.double())
    y = bias_gelu(x, bias)
    assert y.dtype == torch.bfloat16
    ok, errs = bf16_ok(y, F.gelu(x.float() + bias).bfloat16(), exact)
    assert ok, errs
    with pytest.raises(ValueError, match="bias must be"):
        bias_gelu(x, bias[:-1])


# -------------------------------------------------------------------------- drop-path + residual
@pytest.mark.parametrize("r,d", [(1, 1), (7, 33), (300, 192)])
@pytest.mark.parametrize("branch_dtype", [torch.float32, torch.bfloat16])
def test_residual_drop_path(triton_path, r, d, branch_dtype):
    x = torch.randn(r, d, requires_grad=True)
    branch = torch.randn(r, d).to(branch_dtype).requires_grad_()
    scale = torch.where(torch.rand(r) < 0.3, 0.0, 1 / 0.7)
    y = residual_drop_path(x, branch, scale)
    exact = x.detach().double() + branch.detach().double() * scale.double()[:, None]
    assert y.dtype == torch.float32 and rel(y, exact) < 1e-6
    g = torch.randn(r, d)
    gx, gbr = torch.autograd.grad(y, (x, branch), g)
    assert torch.equal(gx, g)  # the residual's grad is the output grad itself
    assert gbr.dtype == branch_dtype
    torch.testing.assert_close(gbr.float(), (g * scale[:, None]).to(branch_dtype).float(), rtol=1e-2 if branch_dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    torch.testing.assert_close(residual_drop_path_ref(x, branch, scale), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="row_scale must be"):
        residual_drop_path(x, branch, scale[:-1] if r > 1 else torch.ones(2))


# ------------------------------------------------------------------------------- in the block
@pytest.mark.parametrize("padded", [False, True])
def test_transformer_blocks_same_on_both_paths(padded):
    """The Transformer (train mode, drop-path on) gives the same output and grads with the Triton block
    ops (block="triton") as with their references (F.layer_norm, F.gelu, addcmul); padded rows run
    packed (per-clip drop-path over sample_of)."""
    from bestrq2.transformer import Transformer

    torch.manual_seed(0)
    x = torch.randn(4, 10, 48)
    pad = torch.zeros(4, 10, dtype=torch.bool)
    if padded:
        pad[1, 7:] = True
        pad[3, 4:] = True
    res = {}
    for path in ("reference", "triton"):
        torch.manual_seed(0)  # the same weights
        model = Transformer(48, 2, 3, drop_path=0.5, attention="sdpa", block=path).train()
        torch.manual_seed(7)  # the same drop-path draws
        xi = x.clone().requires_grad_()
        y = model(xi, pad if padded else None)
        y.square().sum().backward()
        res[path] = (y.detach(), xi.grad, {k: p.grad.clone() for k, p in model.named_parameters()})
    (ya, gxa, ga), (yb, gxb, gb) = res["reference"], res["triton"]
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxb, gxa, rtol=1e-4, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-5, msg=k)
    with torch.no_grad():  # and drop-path did drop something in those runs
        assert not torch.allclose(model.eval()(x, pad if padded else None), ya)
