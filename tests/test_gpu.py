"""GPU suite: the Triton kernels compiled for a real card (not the interpreter), and torch.compile
through the registered ops. Run with ``pytest -m cuda`` on a CUDA machine; deselected elsewhere."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.cuda

from bestrq2 import BestRQ2, BestRQ2Config  # noqa: E402
from bestrq2.kernels import (gather_tokens, gather_tokens_ref, rpq_codes, rpq_scores_ref,  # noqa: E402
                             scatter_tokens, scatter_tokens_ref, spec_patches)


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the GPU suite needs CUDA (run it with pytest -m cuda on a GPU machine)")


def test_rpq_paper_shapes():
    spec = torch.randn(256, 128, 256, device="cuda") * 20 - 40
    p = torch.randn(1, 256, 16, device="cuda") * 0.09
    cb = F.normalize(torch.randn(1, 8192, 16, device="cuda"), dim=-1)
    idx = torch.stack([torch.randperm(128, device="cuda")[:64] for _ in range(256)])
    codes = rpq_codes(spec, p, cb, idx)
    scores = rpq_scores_ref(spec_patches(spec, idx).reshape(-1, 256), p, cb)
    chosen = scores.gather(-1, codes[..., None])[..., 0]
    assert bool(((scores.max(-1).values - chosen) <= 1e-5).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_scatter(dtype):
    b, n, d, m = 64, 128, 768, 61
    x = torch.randn(b, n, d, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.randn(n, d, device="cuda", requires_grad=True)
    perm = torch.stack([torch.randperm(n, device="cuda") for _ in range(b)])
    ci, fi = perm[:, :m], perm[:, m:]
    out, ref = gather_tokens(x, ci, pos), gather_tokens_ref(x, ci, pos)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (x, pos), g), torch.autograd.grad(ref, (x, pos), g)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    ctx = torch.randn(b, m, d, device="cuda", dtype=dtype, requires_grad=True)
    fill = torch.randn(d, device="cuda", requires_grad=True)
    out, ref = scatter_tokens(ctx, ci, fill, fi, pos), scatter_tokens_ref(ctx, ci, fill, fi, pos)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (ctx, fill, pos), g), torch.autograd.grad(ref, (ctx, fill, pos), g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    cfg = BestRQ2Config.preset("tiny", encoder_drop_path=0.0)
    model = BestRQ2(cfg).cuda()
    wave = torch.randn(4, 160_000, device="cuda") * 0.1
    mask = model(wave).mask
    eager = model(wave, mask=mask).loss
    compiled = torch.compile(model)(wave, mask=mask).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "triton", "flash_attn", "fa4"])
@pytest.mark.parametrize("n", [64, 128, 256])
def test_attention_backends_on_gpu(backend, n):
    from bestrq2 import attention as A

    if not A.available()[backend]:
        if backend in ("sdpa", "triton"):
            pytest.fail(f"{backend} must run on every CUDA machine")
        pytest.skip(f"optional {backend} is not installed on this machine")
    lengths = [n, n // 2 + 3, 1]
    q, k, v = (torch.randn(3, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    pad = torch.arange(n, device="cuda")[None] >= torch.tensor(lengths, device="cuda")[:, None]
    out = A.dense_attention(q, k, v, backend, pad)
    ref = A.dense_attention(q.float(), k.float(), v.float(), "math", pad)
    valid = ~pad
    assert (out.float() - ref)[valid].abs().max() < 2e-2
    out[valid].float().square().sum().backward()
    assert torch.isfinite(q.grad).all()


# one length compiled: the whole -m cuda run has two minutes of device time in gpu_session.sh
@pytest.mark.parametrize("n,compiled", [(64, False), (128, False), (256, False), (128, True)])
def test_packed_qkv_attention_on_gpu(n, compiled):
    """The model's Triton form (qkv linear output without its bias, float32 bias fused) on the tensor cores:
    output within 2x the error of PyTorch's own bf16 path ((qkv + bias) in bf16, SDPA) against float64,
    gradients finite, the key bias's gradient zero; eager and under torch.compile."""
    from bestrq2.kernels.attention import qkv_attention_ref, triton_qkv_attention

    lens = [n, n // 2 + 3, 1]
    cu = F.pad(torch.tensor(lens, device="cuda").cumsum(0), (1, 0)).to(torch.int32)
    qkv = torch.randn(sum(lens), 3, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = (torch.randn(3 * 12 * 64, device="cuda") * 0.5).requires_grad_()
    fn = torch.compile(triton_qkv_attention, fullgraph=True) if compiled else triton_qkv_attention
    out = fn(qkv, bias, cu, n)
    exact = qkv_attention_ref(qkv.detach().double(), bias.detach().double(), cu)
    biased = (qkv.detach() + bias.detach().view(3, 12, 64).bfloat16())
    torch_bf16 = torch.cat([F.scaled_dot_product_attention(*(biased[s:e, i].transpose(0, 1) for i in range(3)))
                            .transpose(0, 1) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert (out.double() - exact).abs().max() <= 2 * (torch_bf16.double() - exact).abs().max() + 1e-3
    dqkv, db = torch.autograd.grad(out.float().square().sum(), (qkv, bias))
    assert torch.isfinite(dqkv).all() and torch.isfinite(db).all() and float(db.view(3, -1)[1].abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_sdpa_kernels(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    q, k, v = (torch.randn(8, 12, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(kind):
        out = F.scaled_dot_product_attention(q, k, v)
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 8, -1) @ v.double()
    assert (out.double() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_cuda_graph_replay(precision):
    """The encoder's CUDA-graph path gives the eager path's frames. auto: a shape's first call runs eagerly,
    its second is captured, later ones replay; new weights, another shape or precision start anew; padded or
    large batches stay eager."""
    from bestrq2 import BestRQ2Encoder

    torch.manual_seed(0)
    cfg = BestRQ2Config.preset("tiny")
    graphed = BestRQ2Encoder(cfg, precision=precision).cuda()
    eager = BestRQ2Encoder(cfg, precision=precision, cuda_graphs="off").cuda()
    eager.load_state_dict(graphed.state_dict())
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    wave = torch.randn(2, 48_000, device="cuda") * 0.1
    torch.testing.assert_close(graphed(wave), eager(wave), **tol)  # first: eager
    assert graphed._graphed.captures == 0
    other = torch.randn(2, 48_000, device="cuda") * 0.1  # second: captured
    torch.testing.assert_close(graphed(other), eager(other), **tol)
    assert graphed._graphed.captures == 1
    torch.testing.assert_close(graphed(wave), eager(wave), **tol)  # replayed with the new input
    assert graphed._graphed.captures == 1
    long = torch.randn(1, 160_000, device="cuda") * 0.1
    graphed(long)
    assert graphed._graphed.captures == 1
    graphed(long)
    assert graphed._graphed.captures == 2
    fresh = BestRQ2Encoder(cfg, precision=precision, cuda_graphs="off").cuda()
    graphed.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(graphed(wave), fresh(wave), **tol)  # new weights: eager first
    torch.testing.assert_close(graphed(wave), fresh(wave), **tol)
    assert graphed._graphed.captures == 3
    with torch.inference_mode():  # captured inside inference mode, replayed outside it: normal tensors
        graphed(torch.randn(3, 48_000, device="cuda") * 0.1)
        captured = graphed(torch.randn(3, 48_000, device="cuda") * 0.1)
    assert not captured.is_inference()
    graphed(torch.randn(3, 48_000, device="cuda") * 0.1)
    assert graphed._graphed.captures == 4
    for _ in range(2):
        graphed(torch.randn(16, 48_000, device="cuda") * 0.1)  # auto: batch > 8 runs eagerly
        graphed(wave, lengths=torch.tensor([48_000, 30_000]))  # padded: eager
    assert graphed._graphed.captures == 4
    on = BestRQ2Encoder(cfg, precision=precision, cuda_graphs="on").cuda()
    on(wave)
    assert on._graphed.captures == 1  # "on": captured at once


def test_auto_attention_follows_the_wins_table(monkeypatch):
    """On the card, ``auto`` picks the Triton kernel where the wins table says it won (and only there)."""
    import bestrq2.attention as A

    card = torch.cuda.get_device_name(0)
    x = torch.randn(2, 64, 768, device="cuda")
    flash = A.available()["flash_attn"] or A.available()["fa4"]
    monkeypatch.setattr(A, "_wins_table", {card: [
        {"max_len": 128, "head_dim": 64, "dtype": "float32", "pass": "forward", "triton_over_sdpa": 2.0}]})
    with torch.no_grad():
        assert A.resolve("auto", x, 64, 100) == ("triton" if not flash else A.resolve("auto", x, 64, 100))
        assert A.resolve("auto", x, 64, 200) != "triton"  # longer than measured
    assert A.resolve("auto", x, 64, 100) != "triton"  # training: no train-pass entry
    monkeypatch.setattr(A, "_wins_table", {})
    with torch.no_grad():
        assert A.resolve("auto", x, 64, 100) != "triton"


@pytest.mark.parametrize("with_bb", [False, True])
def test_fused_add_layer_norm_on_gpu_eager_and_compiled(with_bb):
    """The residual add + LayerNorm kernel compiled for the card, in the model's dtypes (float32 stream, bf16
    branch, bf16 y, and the branch's float32 linear bias where the model hands it over): outputs and grads
    against the reference ops, eager and through torch.compile (grads of y only, so the unused s takes
    autograd's zero-filled gradient)."""
    from bestrq2.kernels import add_layer_norm, add_layer_norm_ref

    torch.manual_seed(0)
    x = torch.randn(4096, 768, device="cuda", requires_grad=True)
    br = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(768, device="cuda") + 1).requires_grad_()
    b = torch.randn(768, device="cuda").requires_grad_()
    bb = torch.randn(768, device="cuda").requires_grad_() if with_bb else None
    scale = (torch.rand(4096, device="cuda") > 0.1).float() / 0.9
    params = (w, b, bb) if with_bb else (w, b)

    def fused(x, br):
        return add_layer_norm(x, br, scale, w, b, out_dtype=torch.bfloat16, branch_bias=bb)

    def ref(x, br):
        return add_layer_norm_ref(x, br, scale, w, b, out_dtype=torch.bfloat16, branch_bias=bb)

    gy, gs = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16), torch.randn(4096, 768, device="cuda")
    expect = ref(x, br)
    want = torch.autograd.grad(expect, (x, br, *params), (gs, gy))
    for fn in (fused, torch.compile(fused)):
        got = fn(x, br)
        torch.testing.assert_close(got[0], expect[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1].float(), expect[1].float(), rtol=1.6e-2, atol=1.6e-2)
        for a, e in zip(torch.autograd.grad(got, (x, br, *params), (gs, gy)), want):
            torch.testing.assert_close(a.float(), e.float(), rtol=1.6e-2, atol=1e-2)
    got = torch.compile(lambda x, br: fused(x, br)[1])(x, br)
    ga = torch.autograd.grad(got, (x, br), gy)
    ge = torch.autograd.grad(ref(x, br)[1], (x, br), gy)
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a.float(), e.float(), rtol=1.6e-2, atol=1e-2)
