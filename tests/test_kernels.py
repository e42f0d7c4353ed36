"""Triton kernels (under TRITON_INTERPRET=1 on CPU) against their references.

Tolerances: codes by score (chosen cosine within 1e-5 of the best; exact index where the best two
differ by more than 1e-5); gather/scatter forward are copies and adds done in float32, so exact
against the reference; gradients: grad_x exact, position/fill grads (sums over the batch in another
order) within 1e-5 relative in float32. bf16/fp16 storage: inputs are rounded once, then the kernel
and the reference compute on the same values.
"""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bestrq2 import BestRQ2, BestRQ2Config
from bestrq2.kernels import (gather_tokens, gather_tokens_ref, rpq_codes, rpq_codes_ref, rpq_scores_ref,
                             scatter_tokens, scatter_tokens_ref, spec_patches)
from bestrq2.kernels.rpq_codes import _tf32_hi


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("BESTRQ2_KERNELS", "triton")


def quantizer(c, k, d=16):
    return torch.randn(c, 256, d) * 0.09, F.normalize(torch.randn(c, k, d), dim=-1)


def check_codes(codes, patches, p, cb):
    scores = rpq_scores_ref(patches, p, cb)  # [M, C, K]
    assert codes.dtype == torch.int64 and codes.shape == scores.shape[:2]
    chosen = scores.gather(-1, codes[..., None])[..., 0]
    top2 = scores.topk(2, dim=-1).values
    assert bool(((top2[..., 0] - chosen).abs() <= 1e-5).all())
    clear = (top2[..., 0] - top2[..., 1]) > 1e-5
    assert torch.equal(codes[clear], scores.argmax(-1)[clear])


# ------------------------------------------------------------------------------------- rpq_codes
@pytest.mark.parametrize("c,k", [(1, 8192), (4, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rpq_from_spectrogram_all_tokens(triton_path, c, k, dtype):
    spec = (torch.randn(2, 128, 16 * 5 + 3) * 20 - 40).to(dtype)  # T not a multiple of 16
    p, cb = quantizer(c, k)
    codes = rpq_codes(spec, p, cb)
    assert codes.shape == (2 * 40, c)
    check_codes(codes, spec_patches(spec.float()).reshape(-1, 256), p, cb)


@pytest.mark.parametrize("mode", ["shared", "per_sample", "one", "all"])
def test_rpq_masked_tokens_only(triton_path, mode):
    b, n = 3, 8 * 7
    spec = torch.randn(b, 128, 16 * 7) * 15 - 30
    if mode == "shared":
        idx = torch.randperm(n)[:23].sort().values.expand(b, -1)
    elif mode == "per_sample":
        idx = torch.stack([torch.randperm(n)[:23] for _ in range(b)])
    elif mode == "one":
        idx = torch.randint(0, n, (b, 1))
    else:
        idx = torch.arange(n).expand(b, -1)
    p, cb = quantizer(2, 333)
    codes = rpq_codes(spec, p, cb, idx.to(torch.int32))
    patches = spec_patches(spec, idx).reshape(-1, 256)
    check_codes(codes, patches, p, cb)
    check_codes(rpq_codes_ref(spec, p, cb, idx), patches, p, cb)


@pytest.mark.parametrize("m", [1, 77, 300])
def test_rpq_raw_patches_and_single_clip(triton_path, m):
    x = torch.randn(m, 256) * 10
    p, cb = quantizer(1, 1537, d=12)  # d below the 16-wide dot tile: padded with zeros in the kernel
    check_codes(rpq_codes(x, p, cb), x, p, cb)
    spec = torch.randn(1, 128, 16) * 10  # B = 1, one time patch
    check_codes(rpq_codes(spec, p, cb), spec_patches(spec).reshape(-1, 256), p, cb)


def test_rpq_ties_go_to_lowest_index(triton_path):
    """Exact ties: z = e_0 exactly (one projection column), and codes 3, 4 and 650 equal e_0, so their
    cosines are exactly 1.0 while every other code scores below. torch.argmax picks 3; so must we,
    even though 650 lies in a later codebook tile on the GPU."""
    p = torch.zeros(1, 256, 16)
    p[0, :, 0] = torch.rand(256) + 0.1
    cb = F.normalize(torch.randn(1, 700, 16), dim=-1)
    e0 = torch.zeros(16)
    e0[0] = 1.0
    for k in (3, 4, 650):
        cb[0, k] = e0
    x = torch.rand(40, 256) + 0.1  # positive: x @ p[:, 0] > 0
    codes = rpq_codes(x, p, cb)
    assert bool((codes[:, 0] == 3).all())
    assert torch.equal(codes, rpq_codes_ref(x, p, cb))


@pytest.mark.parametrize("splits", ["2", "4", "9"])
def test_rpq_codebook_split_across_programs(triton_path, monkeypatch, splits):
    """Small batches split the codebook across programs (BESTRQ2_RPQ_SPLIT forces it here; the
    interpreter's 2048-code tiles give at most 4 splits of 8192). Codes match, and a tie between codes
    in different splits (5, 2100, 6500 all equal e_0) still goes to the lowest index."""
    monkeypatch.setenv("BESTRQ2_RPQ_SPLIT", splits)
    p, cb = quantizer(2, 8192)
    spec = torch.randn(2, 32, 16 * 3) * 20 - 40
    check_codes(rpq_codes(spec, p, cb), spec_patches(spec).reshape(-1, 256), p, cb)
    p = torch.zeros(1, 256, 16)
    p[0, :, 0] = torch.rand(256) + 0.1
    cb = F.normalize(torch.randn(1, 8192, 16), dim=-1)
    cb[0, :, 0] = cb[0, :, 0].clamp(max=0.9)  # no random code comes near e_0
    cb = F.normalize(cb, dim=-1)
    for k in (5, 2100, 6500):
        cb[0, k] = F.one_hot(torch.tensor(0), 16).float()
    codes = rpq_codes(torch.rand(24, 256) + 0.1, p, cb)
    assert bool((codes[:, 0] == 5).all())


def test_rpq_zero_patch_and_silence(triton_path):
    p, cb = quantizer(1, 64)
    spec = torch.full((1, 128, 32), -100.0)
    spec[..., 16:] = 0.0  # an all-zero patch column: cosine 0 everywhere -> code 0, as torch.argmax
    codes = rpq_codes(spec, p, cb)
    assert torch.equal(codes, rpq_codes_ref(spec, p, cb))


def test_rpq_validation(triton_path):
    p, cb = quantizer(1, 64)
    spec = torch.randn(2, 128, 32)
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 16\)"):
        rpq_codes(spec, p, cb, torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="index must be"):
        rpq_codes(spec, p, cb, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="int32 or int64"):
        rpq_codes(spec, p, cb, torch.tensor([[0.0], [1.0]]))
    with pytest.raises(ValueError, match="projection must be"):
        rpq_codes(spec, p[:, :100], cb)
    with pytest.raises(ValueError, match="multiple of 16"):
        rpq_codes(torch.randn(2, 100, 32), p, cb)
    with pytest.raises(ValueError, match="256"):
        rpq_codes(torch.randn(5, 255), p, cb)
    with pytest.raises(ValueError, match="float32"):
        rpq_codes(spec.to(torch.int32), p, cb)
    # float64 (the tests' exact-arithmetic runs) takes the reference path, also when Triton is forced
    assert torch.equal(rpq_codes(spec.double(), p.double(), cb.double()), rpq_codes_ref(spec.double(), p, cb))
    with pytest.raises(ValueError, match="contiguous"):
        rpq_codes(spec, p, cb.transpose(1, 2).contiguous().transpose(1, 2))


def low_precision_ok(kernel: torch.Tensor, torch_lp: torch.Tensor, exact: torch.Tensor) -> bool:
    """The standard for low precision: relative error vs float32 at most 2x PyTorch's own in that dtype
    (whose bound is the unit roundoff u = eps / 2). Rounding to bf16/fp16 under the CPU interpreter
    truncates where CUDA rounds to nearest: < 2u against <= u."""
    u = torch.finfo(kernel.dtype).eps / 2
    nz = exact.abs() > 1e-6
    rel_k = ((kernel.float() - exact).abs()[nz] / exact.abs()[nz]).max()
    rel_t = ((torch_lp.float() - exact).abs()[nz] / exact.abs()[nz]).max()
    return bool(rel_t <= u * 1.0001 and rel_k <= 2 * max(float(rel_t), u))


# ------------------------------------------------------------------------------------ gather
SHAPES = [(1, 8, 16, 1), (3, 40, 24, 17), (2, 128, 192, 128), (4, 56, 33, 29)]


def perm_rows(b, n, m):
    return torch.stack([torch.randperm(n)[:m] for _ in range(b)])


@pytest.mark.parametrize("b,n,d,m", SHAPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_gather_forward_backward(triton_path, b, n, d, m, with_pos):
    x = torch.randn(b, n, d, requires_grad=True)
    pos = torch.randn(n, d, requires_grad=True) if with_pos else None
    idx = perm_rows(b, n, m)
    out, ref = gather_tokens(x, idx, pos), gather_tokens_ref(x, idx, pos)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    inputs = (x, pos) if with_pos else (x,)
    ga, gr = torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)
    torch.testing.assert_close(ga[0], gr[0], rtol=0, atol=0)
    if with_pos:
        torch.testing.assert_close(ga[1], gr[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_low_precision_storage(triton_path, dtype):
    x = torch.randn(3, 40, 24).to(dtype).requires_grad_()
    pos = torch.randn(40, 24).requires_grad_()
    idx = perm_rows(3, 40, 11)
    out, ref = gather_tokens(x, idx, pos), gather_tokens_ref(x, idx, pos)
    assert out.dtype == ref.dtype == torch.float32  # x + pos promotes, as in PyTorch
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    ga, gr = torch.autograd.grad(out, (x, pos), g), torch.autograd.grad(ref, (x, pos), g)
    assert ga[0].dtype == dtype
    # the low-precision grad is a rounding of a float32 value: error vs float32 at most 2x PyTorch's own
    x32 = x.detach().float().requires_grad_()
    exact = torch.autograd.grad(gather_tokens_ref(x32, idx, pos), x32, g)[0]
    assert low_precision_ok(ga[0], gr[0], exact)
    torch.testing.assert_close(ga[1], gr[1], rtol=1e-5, atol=1e-6)
    xo = gather_tokens(x, idx)
    assert xo.dtype == dtype and torch.equal(xo, gather_tokens_ref(x, idx))


def test_gather_backward_deterministic(triton_path):
    x = torch.randn(8, 64, 48, requires_grad=True)
    pos = torch.randn(64, 48, requires_grad=True)
    idx = torch.randperm(64)[:30].expand(8, -1)  # a shared mask: every clip hits the same positions
    g = torch.randn(8, 30, 48)
    first = torch.autograd.grad(gather_tokens(x, idx, pos), (x, pos), g)
    second = torch.autograd.grad(gather_tokens(x, idx, pos), (x, pos), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gather_validation(triton_path):
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        gather_tokens(x, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        gather_tokens(x, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="unique"):
        gather_tokens(x, torch.tensor([[3, 3], [1, 2]]))
    with pytest.raises(ValueError, match="pos must be"):
        gather_tokens(x, torch.tensor([[0], [1]]), torch.randn(9, 4))
    with pytest.raises(ValueError, match="idx must be"):
        gather_tokens(x, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="3 dims"):
        gather_tokens(x[0], torch.tensor([[0]]))


# ----------------------------------------------------------------------------------- scatter
def split_rows(b, n, m, shared=False):
    perm = torch.randperm(n).expand(b, -1) if shared else torch.stack([torch.randperm(n) for _ in range(b)])
    ctx_idx, fill_idx = perm[:, :m].sort(dim=1).values, perm[:, m:].sort(dim=1).values
    return ctx_idx.contiguous(), fill_idx.contiguous()


@pytest.mark.parametrize("b,n,d,m", [(1, 8, 16, 1), (3, 40, 24, 17), (2, 128, 64, 127), (4, 56, 33, 29)])
@pytest.mark.parametrize("shared", [True, False])
def test_scatter_forward_backward(triton_path, b, n, d, m, shared):
    ctx = torch.randn(b, m, d, requires_grad=True)
    fill = torch.randn(d, requires_grad=True)
    pos = torch.randn(n, d, requires_grad=True)
    ci, fi = split_rows(b, n, m, shared)
    out, ref = scatter_tokens(ctx, ci, fill, fi, pos), scatter_tokens_ref(ctx, ci, fill, fi, pos)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    ga, gr = torch.autograd.grad(out, (ctx, fill, pos), g), torch.autograd.grad(ref, (ctx, fill, pos), g)
    torch.testing.assert_close(ga[0], gr[0], rtol=0, atol=0)
    torch.testing.assert_close(ga[1], gr[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga[2], gr[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunks", ["2", "3", "7"])
def test_backward_batch_chunks(triton_path, monkeypatch, chunks):
    """The position grads sum over the batch in slices (more programs on a GPU), then add the
    slices: same values as the reference, bit-identical on a rerun. 7 slices of 5 clips leave uneven ones."""
    monkeypatch.setenv("BESTRQ2_BATCH_CHUNKS", chunks)
    b, n, d, m = 5, 40, 24, 17
    x, pos = torch.randn(b, n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    idx = perm_rows(b, n, m)
    g = torch.randn(b, m, d)
    ga = torch.autograd.grad(gather_tokens(x, idx, pos), (x, pos), g)
    gr = torch.autograd.grad(gather_tokens_ref(x, idx, pos), (x, pos), g)
    torch.testing.assert_close(ga[0], gr[0], rtol=0, atol=0)
    torch.testing.assert_close(ga[1], gr[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(ga[1], torch.autograd.grad(gather_tokens(x, idx, pos), (x, pos), g)[1])
    ctx, fill = torch.randn(b, m, d, requires_grad=True), torch.randn(d, requires_grad=True)
    ci, fi = split_rows(b, n, m)
    go = torch.randn(b, n, d)
    sa = torch.autograd.grad(scatter_tokens(ctx, ci, fill, fi, pos), (ctx, fill, pos), go)
    sr = torch.autograd.grad(scatter_tokens_ref(ctx, ci, fill, fi, pos), (ctx, fill, pos), go)
    torch.testing.assert_close(sa[1], sr[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sa[2], sr[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(sa[2], torch.autograd.grad(scatter_tokens(ctx, ci, fill, fi, pos), (ctx, fill, pos), go)[2])


def test_scatter_low_precision_and_determinism(triton_path):
    ctx = torch.randn(3, 20, 24).to(torch.bfloat16).requires_grad_()
    fill = torch.randn(24).requires_grad_()
    pos = torch.randn(48, 24).requires_grad_()
    ci, fi = split_rows(3, 48, 20)
    out, ref = scatter_tokens(ctx, ci, fill, fi, pos), scatter_tokens_ref(ctx, ci, fill, fi, pos)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(scatter_tokens(ctx, ci, fill, fi, pos), (ctx, fill, pos), g)
    gb = torch.autograd.grad(scatter_tokens(ctx, ci, fill, fi, pos), (ctx, fill, pos), g)
    gr = torch.autograd.grad(ref, (ctx, fill, pos), g)
    assert ga[0].dtype == torch.bfloat16 and all(torch.equal(a, b) for a, b in zip(ga, gb))
    exact = torch.gather(g, 1, ci[..., None].expand(-1, -1, 24))  # grad of ctx in float32
    assert low_precision_ok(ga[0], gr[0], exact)
    torch.testing.assert_close(ga[2], gr[2], rtol=1e-5, atol=1e-6)


def test_scatter_validation(triton_path):
    ctx, fill, pos = torch.randn(2, 3, 4), torch.randn(4), torch.randn(6, 4)
    ci, fi = split_rows(2, 6, 3)
    bad = fi.clone()
    bad[0, 0] = ci[0, 0]
    with pytest.raises(ValueError, match="permutation"):
        scatter_tokens(ctx, ci, fill, bad, pos)
    with pytest.raises(ValueError, match=r"lie in \[0, 6\)"):
        scatter_tokens(ctx, ci, fill, fi + 10, pos)
    with pytest.raises(ValueError, match="fill must be"):
        scatter_tokens(ctx, ci, torch.randn(5), fi, pos)
    with pytest.raises(ValueError, match="fill_pos must be"):
        scatter_tokens(ctx, ci, fill, fi, torch.randn(7, 4))


# ------------------------------------------------------------------------------ dispatch, model
def test_backend_variable(monkeypatch):
    from bestrq2.kernels import backend

    monkeypatch.setenv("BESTRQ2_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="BESTRQ2_KERNELS"):
        backend()
    monkeypatch.setenv("BESTRQ2_KERNELS", "reference")
    assert backend() == "reference"


def test_check_policy(monkeypatch):
    """Index checks: always on CPU tensors, on CUDA tensors only with BESTRQ2_CHECK=1 (each one is a
    device sync), off everywhere with BESTRQ2_CHECK=0; a bad index then reaches the kernel unchecked."""
    from types import SimpleNamespace

    from bestrq2.kernels._dispatch import checking

    cpu, cuda = torch.zeros(1), SimpleNamespace(is_cuda=True)  # checking() only asks is_cuda
    monkeypatch.delenv("BESTRQ2_CHECK", raising=False)
    assert checking(cpu) and not checking(cuda)
    monkeypatch.setenv("BESTRQ2_CHECK", "1")
    assert checking(cpu) and checking(cuda)
    monkeypatch.setenv("BESTRQ2_CHECK", "0")
    assert not checking(cpu) and not checking(cuda)
    monkeypatch.setenv("BESTRQ2_CHECK", "auto")
    with pytest.raises(ValueError, match="must lie in"):
        gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0, 5], [1, 2]]))


def test_launch_arithmetic_is_tritons():
    """The launchers' cdiv / next_power_of_2 (plain Python: triton's are ~5 us host calls) give triton's
    values on every size up to 70,000 and on SymInts (compile traces the op bodies with them)."""
    import triton
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from bestrq2.kernels._dispatch import cdiv, next_power_of_2

    for n in list(range(0, 4100)) + [65535, 65536, 65537, 69999]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    env = ShapeEnv()
    s = env.create_unbacked_symint()
    assert str(cdiv(s, 64)) == str(triton.cdiv(s, 64))


def test_ops_trace_without_graph_breaks(triton_path):
    """Dynamo sees the registered bestrq2:: ops as single nodes: one frame, fullgraph, same numbers.
    (aot/inductor compilation of the Triton kernels needs a GPU: the interpreter cannot run them
    on fake tensors; the GPU suite covers it.)"""
    import torch._dynamo.testing

    b, n, d, m = 2, 32, 8, 9
    x = torch.randn(b, n, d, requires_grad=True)
    pos, fill = torch.randn(n, d), torch.randn(d)
    ci, fi = split_rows(b, n, m)
    spec = torch.randn(b, 128, 64)
    p, cb = quantizer(1, 100)

    def f(x):
        y = scatter_tokens(gather_tokens(x, ci, pos) * 2, ci, fill, fi, pos)
        return y.square().sum(), rpq_codes(spec, p, cb, fi)

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    (la, ca), (lb, cb_) = compiled(x), f(x)
    assert counter.frame_count == 1
    assert la.item() == lb.item() and torch.equal(ca, cb_)
    torch.testing.assert_close(torch.autograd.grad(la, x)[0], torch.autograd.grad(lb, x)[0])


@pytest.mark.parametrize("one_stage", [False, True])
@pytest.mark.parametrize("mask_mode", ["shared", "per_sample"])
def test_training_step_same_with_triton_and_reference(monkeypatch, one_stage, mask_mode):
    cfg = BestRQ2Config.preset("tiny", encoder_depth=2, predictor_depth=1, one_stage=one_stage,
                               mask_mode=mask_mode, num_codebooks=2, codebook_size=1024)
    model = BestRQ2(cfg)
    wave = torch.randn(3, 40_000) * 0.1
    mask = model(wave).mask  # one draw, used by both paths
    results = {}
    for path in ("reference", "triton"):
        monkeypatch.setenv("BESTRQ2_KERNELS", path)
        model.zero_grad()
        torch.manual_seed(123)  # the same drop-path draws on both paths
        out = model(wave, mask=mask)
        out.loss.backward()
        results[path] = (out.loss.detach(), out.targets, {k: p.grad.clone() for k, p in model.named_parameters()})
    (la, ta, ga), (lb, tb, gb) = results["reference"], results["triton"]
    assert torch.equal(ta, tb)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


def test_constant_position_tables_get_no_gradient(triton_path):
    """The model's sincos tables do not require grad: the backward skips their batch sums and still gives
    the reference's grads for what does need them."""
    b, n, d, m = 3, 40, 24, 17
    x = torch.randn(b, n, d, requires_grad=True)
    pos = torch.randn(n, d)  # constant
    idx = perm_rows(b, n, m)
    g = torch.randn(b, m, d)
    (gx,) = torch.autograd.grad(gather_tokens(x, idx, pos), (x,), g)
    torch.testing.assert_close(gx, torch.autograd.grad(gather_tokens_ref(x, idx, pos), (x,), g)[0], rtol=0, atol=0)
    ctx = torch.randn(b, n - m, d, requires_grad=True)
    fill = torch.randn(d, requires_grad=True)
    ci = perm_rows(b, n, n)
    out = scatter_tokens(ctx, ci[:, : n - m], fill, ci[:, n - m:], pos)
    ref = scatter_tokens_ref(ctx, ci[:, : n - m], fill, ci[:, n - m:], pos)
    go = torch.randn_like(out)
    ga, gr = torch.autograd.grad(out, (ctx, fill), go), torch.autograd.grad(ref, (ctx, fill), go)
    torch.testing.assert_close(ga[0], gr[0], rtol=0, atol=0)
    torch.testing.assert_close(ga[1], gr[1], rtol=1e-5, atol=1e-5)
    fill.requires_grad_(False)
    (gc,) = torch.autograd.grad(scatter_tokens(ctx, ci[:, : n - m], fill, ci[:, n - m:], pos), (ctx,), go)
    torch.testing.assert_close(gc, gr[0], rtol=0, atol=0)


def test_rpq_near_ties_are_rescored_in_ieee(triton_path, monkeypatch):
    """The fast scores (tf32x3 on a GPU) keep best and runner-up; rows within RESCORE_MARGIN get IEEE
    float32 scores in a second launch. The rescoring launch writes exactly the flagged rows, and with
    every row flagged the codes still equal the reference's (ties included)."""
    import importlib

    R = importlib.import_module("bestrq2.kernels.rpq_codes")  # the module (the package exports the function)

    p, cb = quantizer(2, 3000)
    spec = torch.randn(3, 128, 16 * 4) * 20 - 40
    idx = perm_rows(3, 32, 11)
    ref = rpq_codes_ref(spec, p, cb, idx)
    codes = torch.full_like(ref, -1)
    need = (torch.rand(ref.shape) < 0.3).to(torch.int8)
    need[0, :] = 1
    R.rescore_rows(spec, p, cb, idx.contiguous(), codes, need)
    assert torch.equal(codes[need.bool()], ref[need.bool()]) and bool((codes[~need.bool()] == -1).all())
    for margin in (10.0, -1.0):  # all rows rescored / none
        monkeypatch.setattr(R, "RESCORE_MARGIN", margin)
        check_codes(rpq_codes(spec, p, cb, idx), spec_patches(spec, idx).reshape(-1, 256), p, cb)
        monkeypatch.setenv("BESTRQ2_RPQ_SPLIT", "2")  # merged splits: the runner-up across splits
        check_codes(rpq_codes(spec, p, cb, idx), spec_patches(spec, idx).reshape(-1, 256), p, cb)
        monkeypatch.delenv("BESTRQ2_RPQ_SPLIT")


@triton.jit
def _tf32_hi_kernel(x_ptr, hi_ptr, n, BLOCK: tl.constexpr):  # the RPQ kernel's split, on its own
    o = tl.arange(0, BLOCK)
    m = o < n
    tl.store(hi_ptr + o, _tf32_hi(tl.load(x_ptr + o, mask=m, other=0.0)), mask=m)


def test_rpq_tf32x3_split_as_the_tensor_cores_see_them():
    """The kernel's 3xTF32 scores: z and each codebook tile split into hi = nearest tf32 (``_tf32_hi``)
    and lo = x - hi, then lo*hi + hi*lo + hi*hi on the tensor cores, which read float32 operands as tf32
    by dropping the low 13 mantissa bits. The interpreter's dots are exact, so the split is checked
    here: hi is a tf32 within half a tf32 ulp of x, and the emulated GPU scores of unit vectors
    (d 16) lie within 1e-6 of float64 (about 2e-7 seen), far inside RESCORE_MARGIN (1e-4);
    plain tf32 scores (about 1e-3 off) miss by more than the margin, which is why the split exists."""
    import importlib

    R = importlib.import_module("bestrq2.kernels.rpq_codes")

    def hi_of(x):
        out = torch.empty_like(x)
        _tf32_hi_kernel[(1,)](x.reshape(-1), out.reshape(-1), x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
        return out

    def as_tf32(x):  # what the tensor cores read: the low 13 mantissa bits dropped
        return (x.view(torch.int32) & -8192).view(torch.float32)

    torch.manual_seed(5)
    z = F.normalize(torch.randn(64, 16), dim=-1)
    cb = F.normalize(torch.randn(512, 16), dim=-1)
    wide = torch.randn(4096) * torch.logspace(-6, 6, 4096)
    hi = hi_of(wide)
    assert torch.equal(as_tf32(hi), hi)  # a tf32 exactly
    assert bool(((wide - hi).abs() <= wide.abs() * 2.0**-11).all())  # rounded to nearest
    z_hi, cb_hi = hi_of(z), hi_of(cb)
    z_lo, cb_lo = z - z_hi, cb - cb_hi
    d = lambda a, b: as_tf32(a).double() @ as_tf32(b).double().T  # noqa: E731
    split = d(z_lo, cb_hi) + d(z_hi, cb_lo) + d(z_hi, cb_hi)
    exact = z.double() @ cb.double().T
    assert (split - exact).abs().max() < 1e-6
    assert (d(z, cb) - exact).abs().max() > R.RESCORE_MARGIN


@pytest.mark.parametrize("splits", ["1", "3"])
def test_rpq_top_two_over_many_small_tiles(triton_path, monkeypatch, splits):
    """The first launch keeps best / runner-up / code per (row, column slot) across codebook tiles and
    reduces over the slots at the end. With 32-code tiles (10 of them at K 300, and the codebook also
    split across programs): best and runner-up equal the float64 top two within 1e-5, a row's runner-up
    can sit in the winner's own slot (codes 8 and 40), and among equal maxima the lowest code wins even
    when it sits in a later slot than another (code 31 in slot 31, code 70 in slot 6 of a later tile)."""
    import importlib

    R = importlib.import_module("bestrq2.kernels.rpq_codes")
    monkeypatch.setenv("BESTRQ2_RPQ_CFG", "16,32,4")
    monkeypatch.setenv("BESTRQ2_RPQ_SPLIT", splits)
    torch.manual_seed(3)
    p, cb = quantizer(2, 300)
    x = torch.randn(40, 256)
    scores = rpq_scores_ref(x.double(), p, cb)  # [M, C, K] float64
    top2 = scores.topk(2, dim=-1).values
    best, runner, codes, need = R.top_two(x, p, cb, None)
    assert torch.allclose(best.double(), top2[..., 0], atol=1e-5, rtol=0)
    assert torch.allclose(runner.double(), top2[..., 1], atol=1e-5, rtol=0)
    check_codes(codes, x, p, cb)
    assert torch.equal(need.bool(), (best - runner) < R.RESCORE_MARGIN)

    # constructed: z = e_0 for every row (one projection column, positive inputs)
    p = torch.zeros(1, 256, 16)
    p[0, :, 0] = torch.rand(256) + 0.1
    cb = F.normalize(torch.randn(1, 300, 16), dim=-1)
    cb[0, :, 0] = cb[0, :, 0].clamp(max=0.5)
    cb = F.normalize(cb, dim=-1)  # every random code scores below 0.5
    e0 = F.one_hot(torch.tensor(0), 16).float()
    near = F.normalize(e0 + 0.1 * F.one_hot(torch.tensor(1), 16).float(), dim=0)  # cosine 0.995 with e_0
    cb[0, 8], cb[0, 40] = near, e0  # winner 40 and runner-up 8 share slot 8
    x = torch.rand(24, 256) + 0.1
    best, runner, codes, need = R.top_two(x, p, cb, None)
    assert bool((codes[:, 0] == 40).all())
    assert torch.allclose(best, torch.ones_like(best), atol=1e-6)
    assert torch.allclose(runner, torch.full_like(runner, float(near[0])), atol=1e-6)
    assert not bool(need.any())
    cb[0, 8] = cb[0, 9]
    cb[0, 70], cb[0, 31] = e0, e0  # equal maxima: 31 (slot 31, first tile), 40 (slot 8), 70 (slot 6)
    best, runner, codes, need = R.top_two(x, p, cb, None)
    assert bool((codes[:, 0] == 31).all()) and bool(need.all())
    assert torch.equal(rpq_codes(x, p, cb), rpq_codes_ref(x, p, cb))


@pytest.mark.parametrize("norm", ["none", "patch", "bin"])
@pytest.mark.parametrize("with_index", [False, True])
def test_rpq_input_normalisation_against_float64(triton_path, norm, with_index):
    """rpq_norm: none (the paper), patch (each 256-value patch standardised), bin (the log-mel standardised
    per mel bin with corpus statistics). Kernel and reference against float64: the chosen code's exact
    score within 1e-5 of the best, and the same index wherever the best two differ by more."""
    from bestrq2.kernels.rpq_codes import normalize_input, normalize_patches

    g = torch.Generator().manual_seed(3)
    spec = torch.randn(2, 128, 16 * 3, generator=g) * 20 - 40 + torch.linspace(0, 30, 128)[:, None]
    p, cb = quantizer(1, 2000)
    idx = perm_rows(2, 24, 9) if with_index else None
    mean, std = spec.mean((0, 2)), spec.std((0, 2)) + 0.5
    x64 = spec_patches(normalize_input(spec.double(), norm, mean.double(), std.double()), idx)
    x64 = normalize_patches(x64.reshape(-1, 256), norm)
    z = F.normalize(x64 @ p[0].double(), dim=-1)
    scores = z @ cb[0].double().T
    top2 = scores.topk(2, dim=-1).values
    for codes in (rpq_codes(spec, p, cb, idx, norm=norm, bin_mean=mean, bin_std=std),
                  rpq_codes_ref(spec, p, cb, idx, norm=norm, bin_mean=mean, bin_std=std)):
        chosen = scores.gather(-1, codes[:, :1])[:, 0]
        assert bool(((top2[:, 0] - chosen) <= 1e-5).all())
        clear = (top2[:, 0] - top2[:, 1]) > 1e-5
        assert torch.equal(codes[clear, 0], scores.argmax(-1)[clear])
    if norm != "none":  # it changes the codes (mean removal at least)
        assert not torch.equal(rpq_codes(spec, p, cb, idx, norm=norm, bin_mean=mean, bin_std=std), rpq_codes(spec, p, cb, idx))


def test_rpq_norm_errors():
    p, cb = quantizer(1, 64)
    spec = torch.randn(2, 128, 32)
    with pytest.raises(ValueError, match="norm must be one of"):
        rpq_codes(spec, p, cb, norm="layer")
    with pytest.raises(ValueError, match="bin_mean and bin_std"):
        rpq_codes(spec, p, cb, norm="bin")
    with pytest.raises(ValueError, match="mel bins"):
        rpq_codes(torch.randn(5, 256), p, cb, norm="bin", bin_mean=torch.zeros(128), bin_std=torch.ones(128))
    with pytest.raises(ValueError, match="positive"):
        rpq_codes(spec, p, cb, norm="bin", bin_mean=torch.zeros(128), bin_std=torch.zeros(128))
