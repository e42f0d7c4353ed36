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
    # the loss is a fixed random projection of the output: with y.square().sum() the output projections' bias
    # grads cancelled to ~6e-4 from row terms of ~30, so they differed between two float32 paths by ~1e-5 (1.1e-5
    # under ATEN_CPU_CAPABILITY=default) and a comparison of them said nothing; here every grad is O(1)
    r = torch.randn(4, 10, 48, generator=torch.Generator().manual_seed(3))
    res = {}
    for path in ("reference", "triton"):
        torch.manual_seed(0)  # the same weights
        model = Transformer(48, 2, 3, drop_path=0.5, attention="sdpa", block=path).train()
        torch.manual_seed(7)  # the same drop-path draws
        xi = x.clone().requires_grad_()
        y = model(xi, pad if padded else None)
        y.mul(r).sum().backward()
        res[path] = (y.detach(), xi.grad, {k: p.grad.clone() for k, p in model.named_parameters()})
    (ya, gxa, ga), (yb, gxb, gb) = res["reference"], res["triton"]
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxb, gxa, rtol=1e-4, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-5, msg=k)
    with torch.no_grad():  # and drop-path did drop something in those runs
        assert not torch.allclose(model.eval()(x, pad if padded else None), ya)


# ----------------------------------------------------------------------- residual add + layer norm
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("with_ds", [False, True])
@pytest.mark.parametrize("with_bb", [False, True])
def test_add_layer_norm_float32_against_float64(triton_path, shape, scaled, with_ds, with_bb):
    """s = x + (branch + branch_bias) * scale, y = LayerNorm(s); backward from grad_y and (or not) grad_s:
    grad_x = grad_s + the LayerNorm's dx, grad_branch = that times the scale (a zero scale: a dropped clip's
    rows), grad_branch_bias = grad_branch summed over rows (across the kernel's row blocks)."""
    from bestrq2.kernels import add_layer_norm, add_layer_norm_ref

    d, rows = shape[-1], int(torch.tensor(shape[:-1]).prod())
    x = (torch.randn(shape) * 3 + 1.5).requires_grad_()
    br = torch.randn(shape).requires_grad_()
    w, b = (torch.randn(d) + 1).requires_grad_(), torch.randn(d).requires_grad_()
    bb = (torch.randn(d) * 2).requires_grad_() if with_bb else None
    scale = torch.where(torch.rand(rows) < 0.3, 0.0, 1 / 0.9) if scaled else None
    s, y = add_layer_norm(x, br, scale, w, b, branch_bias=bb)
    x64, br64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, br, w, b))
    bb64 = bb.detach().double().requires_grad_() if with_bb else None
    s64 = x64 + (br64 + (bb64 if with_bb else 0.0)) * (scale.double().view(shape[:-1] + (1,)) if scaled else 1.0)
    y64 = F.layer_norm(s64, (d,), w64, b64, 1e-5)
    assert s.dtype == y.dtype == torch.float32 and s.shape == y.shape == x.shape
    assert rel(s, s64) < 1e-6 and rel(y, y64) < 1e-5
    gy, gs = torch.randn_like(y64), torch.randn_like(s64)
    outs, outs64 = ((s, y), (s64, y64)) if with_ds else ((y,), (y64,))
    cots, cots64 = ((gs.float(), gy.float()), (gs, gy)) if with_ds else ((gy.float(),), (gy,))
    ins, ins64 = ((x, br, w, b, bb), (x64, br64, w64, b64, bb64)) if with_bb else ((x, br, w, b), (x64, br64, w64, b64))
    grads = torch.autograd.grad(outs, ins, cots)
    grads64 = torch.autograd.grad(outs64, ins64, cots64)
    for name, a, e in zip(("x", "branch", "weight", "bias", "branch_bias"), grads, grads64):
        assert a.dtype == torch.float32 and rel(a, e) < 1e-5, name
    ref = add_layer_norm_ref(x, br, scale, w, b, branch_bias=bb)
    torch.testing.assert_close(ref[0], s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref[1], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bb", [False, True])
def test_add_layer_norm_bf16_branch_fp32_stream_under_autocast(triton_path, with_bb):
    """The model's dtypes: a float32 residual stream, a bf16 branch (and its linear's float32 bias, added in
    float32), y in the autocast dtype (bf16) within 2x PyTorch's own bf16 error; grad_x float32, grad_branch
    bf16, grad_branch_bias float32, against float64."""
    from bestrq2.kernels import add_layer_norm

    x = (torch.randn(96, 768) * 2).requires_grad_()
    br = torch.randn(96, 768).bfloat16().requires_grad_()
    w, b = torch.randn(768) + 1, torch.randn(768)
    bb = torch.randn(768).requires_grad_() if with_bb else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, y = add_layer_norm(x, br, None, w, b, branch_bias=bb)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    s64 = x.detach().double() + br.detach().double() + (bb.detach().double() if with_bb else 0.0)
    assert rel(s, s64) < 1e-6
    exact = F.layer_norm(s64, (768,), w.double(), b.double(), 1e-5)
    ok, errs = bf16_ok(y.detach(), F.layer_norm(s64.float(), (768,), w, b).bfloat16(), exact)
    assert ok, errs
    gy = torch.randn(96, 768)
    gx, gbr, *gbb = torch.autograd.grad(y, (x, br, bb) if with_bb else (x, br), gy.bfloat16())
    s64r = s64.clone().requires_grad_()
    g64 = torch.autograd.grad(F.layer_norm(s64r, (768,), w.double(), b.double(), 1e-5), s64r,
                              gy.bfloat16().double())[0]
    assert gx.dtype == torch.float32 and rel(gx, g64) < 1e-5
    assert gbr.dtype == torch.bfloat16
    ok, errs = bf16_ok(gbr, g64.float().bfloat16(), g64)
    assert ok, errs
    if with_bb:  # summed from float32 row-block partials, not from the bf16 grad_branch
        assert gbb[0].dtype == torch.float32 and rel(gbb[0], g64.sum(0)) < 1e-5


@pytest.mark.parametrize("clips,length", [(3, 37), (1, 5), (4, 1)])
def test_add_layer_norm_scale_per_clip_equals_per_row(triton_path, clips, length):
    """row_scale [B] on x [B, L, D] (a factor per block of L rows, what the fused blocks pass) is bit-equal to
    the same factors repeated to [rows], forward and backward, on the kernel and on the reference."""
    from bestrq2.kernels import add_layer_norm, add_layer_norm_ref

    x = torch.randn(clips, length, 48, requires_grad=True)
    br = torch.randn(clips, length, 48, requires_grad=True)
    w, b, bb = torch.randn(48) + 1, torch.randn(48), torch.randn(48, requires_grad=True)
    per_clip = torch.tensor([0.0, 1 / 0.9, 1 / 0.9, 0.0])[:clips]
    gs, gy = torch.randn(clips, length, 48), torch.randn(clips, length, 48)
    for fn in (add_layer_norm, add_layer_norm_ref):
        runs = []
        for scale in (per_clip, per_clip.repeat_interleave(length)):
            s, y = fn(x, br, scale, w, b, branch_bias=bb)
            runs.append((s, y, *torch.autograd.grad((s, y), (x, br, bb), (gs, gy))))
        for a, e in zip(*runs):
            assert torch.equal(a, e), fn.__name__
    assert torch.equal(runs[0][3][0], torch.zeros(length, 48))  # clip 0 dropped: no branch gradient


def test_add_layer_norm_errors(triton_path):
    from bestrq2.kernels import add_layer_norm

    x, w, b = torch.randn(4, 16), torch.ones(16), torch.zeros(16)
    with pytest.raises(ValueError, match="branch must match"):
        add_layer_norm(x, torch.randn(4, 15), None, w, b)
    with pytest.raises(ValueError, match="row_scale must be"):
        add_layer_norm(x, torch.randn(4, 16), torch.ones(3), w, b)  # 3 does not divide 4 rows
    with pytest.raises(ValueError, match="row_scale must be"):
        add_layer_norm(x, torch.randn(4, 16), torch.ones(8), w, b)  # more factors than rows
    with pytest.raises(ValueError, match="row_scale must be"):
        add_layer_norm(x, torch.randn(4, 16), torch.ones(0), w, b)
    with pytest.raises(ValueError, match="weight and bias"):
        add_layer_norm(x, torch.randn(4, 16), None, torch.ones(15), b)
    with pytest.raises(ValueError, match="branch_bias must be"):
        add_layer_norm(x, torch.randn(4, 16), None, w, b, branch_bias=torch.zeros(15))


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_blocks_match_unfused(monkeypatch, autocast):
    """On the Triton path the stack runs every residual add fused with the LayerNorm after it (2 per block,
    the last into the final norm), taking the attention and MLP output projections' biases: in float32 the
    same output (dtype included) and grads as the unfused Triton blocks (``fuse_blocks = False``, what FSDP
    gets), with the same drop-path draws; under bf16 autocast at most 2x the unfused blocks' error against
    the float32 run."""
    import bestrq2.transformer as T

    calls = []
    fused = T.add_layer_norm
    monkeypatch.setattr(T, "add_layer_norm", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    x = torch.randn(3, 12, 64)
    cot = torch.randn(3, 12, 64)
    res = {}
    runs = [(False, autocast), (True, autocast)] + ([(False, False)] if autocast else [])
    for fuse, cast in runs:
        torch.manual_seed(0)
        model = T.Transformer(64, 3, 4, drop_path=0.4, attention="sdpa", block="triton").train()
        with torch.no_grad():  # non-zero linear biases (init zeroes them): the fused adds take proj's and fc2's
            for name, p in model.named_parameters():
                if name.endswith(("proj.bias", "fc2.bias", "qkv.bias", "fc1.bias")):
                    p.normal_()
        model.fuse_blocks = fuse
        torch.manual_seed(11)
        xi = x.clone().requires_grad_()
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            y = model(xi)
        (y.float() * cot).sum().backward()  # a random cotangent: y.square() gave bias grads near 0 (the final norm)
        res[fuse, cast] = (y.detach(), xi.grad, {k: p.grad.clone() for k, p in model.named_parameters()})
        assert len(calls) == (2 * 3 if fuse else 0)
    (ya, gxa, ga), (yb, gxb, gb) = res[False, autocast], res[True, autocast]
    assert yb.dtype == ya.dtype == torch.float32
    if not autocast:
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yb, ya, **tol)
        torch.testing.assert_close(gxb, gxa, **tol)
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k], **tol, msg=k)
        return
    # under bf16 autocast the two differ by more than rounding order: unfused, each projection's bias is cast to
    # bf16 and its output rounded with it; fused, the bias is added to the rounded output in float32. Each
    # against the float32 run (same draws): the fused error (relative, in norm) at most 2x the unfused one
    (yt, gxt, gt) = res[False, False]
    err = lambda a, t: ((a.float() - t).norm() / t.norm().clamp_min(1e-30)).item()  # noqa: E731  (relative, whole tensor)
    assert err(yb, yt) <= 2 * err(ya, yt) + 1e-6
    assert err(gxb, gxt) <= 2 * err(gxa, gxt) + 1e-6
    for k in ga:
        assert err(gb[k], gt[k]) <= 2 * err(ga[k], gt[k]) + 1e-6, k


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_fused_stack_backward_writes_no_zero_gradients(attention):
    """The custom ops' auxiliary outputs (LayerNorm statistics, the attention's log-sum-exp, the stack's last
    unused s) get no gradient tensors: autograd used to write a zero tensor for each (11-13 in this two-block
    stack, 89 a ViT-B step, two of them of the residual stream's size); their backwards take None. The
    gradients are checked against the reference path in the tests above."""
    from conftest import aten_ops

    from bestrq2.transformer import Transformer

    torch.manual_seed(0)
    stack = Transformer(64, 2, 2, drop_path=0.1, attention=attention, block="triton").train()
    x = torch.randn(2, 10, 64, requires_grad=True)
    y = stack(x)
    ops = aten_ops(lambda: y.square().sum().backward())
    assert len(ops) > 50  # the backward ran under the recorder
    assert not [op for op in ops if "zero" in op or "fill" in op], ops
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_stack_draws_every_drop_path_factor_at_once(triton_path, path):
    """A training forward draws all its drop-path factors in one bernoulli and one division (it drew two ops per
    add); eval draws none. The law is per-add drop path's: each block's two adds drop a clip with its own
    rate, independently, keep it at 1 / keep; blocks at rate 0 take no factors."""
    from conftest import aten_ops

    from bestrq2.transformer import Transformer

    stack = Transformer(32, 4, 2, drop_path=0.3, attention="sdpa", block=path).train()
    x = torch.randn(3, 5, 32)
    ops = aten_ops(lambda: stack(x))
    assert ops.count("aten.bernoulli") + ops.count("aten.bernoulli_") == 1 and ops.count("aten.div_") == 1, ops
    assert not any(op.startswith("aten.bernoulli") for op in aten_ops(lambda: stack.eval()(x)))
    stack.train()
    rates = [blk.drop_path.p for blk in stack.blocks]  # 0, 0.1, 0.2, 0.3
    draws = [stack.drop_factors(20_000, torch.device("cpu")) for _ in range(2)]
    assert draws[0][0] is None and all(d is not None for d in draws[0][1:])
    for i, rate in enumerate(rates[1:], 1):
        attn, mlp = draws[0][i]
        for f in (attn, mlp):
            assert torch.equal(f.unique(), torch.tensor([0.0, 1.0]) / torch.tensor(1 - rate))
            assert abs(float((f == 0).float().mean()) - rate) < 0.015
        assert not torch.equal(attn, mlp) and not torch.equal(attn, draws[1][i][0])  # independent draws
        both = float(((attn == 0) & (mlp == 0)).float().mean())
        assert abs(both - rate * rate) < 0.01


def test_stack_drop_path_traces_in_one_graph():
    """torch.compile traces a training forward with the stack's drop-path draw in one graph (the kept keep
    probabilities built inline, nothing kept while tracing) and the backward runs."""
    from bestrq2.transformer import Transformer

    stack = Transformer(32, 3, 2, drop_path=0.3, attention="sdpa", block="reference").train()
    y = torch.compile(stack, backend="eager", fullgraph=True)(torch.randn(2, 5, 32, requires_grad=True))
    y.sum().backward()
    assert stack.__dict__.get("_keep_probs", {}) == {} and stack.blocks[1].mlp.fc1.weight.grad is not None
