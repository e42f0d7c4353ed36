"""Fused head + cross-entropy (Triton under the interpreter) against float64 PyTorch.

Tolerances: float32 inputs: loss within 1e-5 relative, grads within 1e-5 relative of their largest
element (float64 reference). bf16 inputs: the kernel's error against float64 at most 2x the error
of PyTorch's own bf16 computation (logits in bf16, F.cross_entropy, autograd).
"""
import pytest
import torch
import torch.nn.functional as F

from bestrq2 import BestRQ2, BestRQ2Config
from bestrq2.kernels import choose_chunk, linear_cross_entropy, linear_cross_entropy_ref

IGN = -100


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("BESTRQ2_KERNELS", "triton")


def ref64(h, w, b, t):
    """float64 loss and grads, written directly with F.cross_entropy per codebook."""
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    losses = []
    for c in range(w.shape[0]):
        logits = h @ w[c].T + (0 if b is None else b[c])
        losses.append(F.cross_entropy(logits, t[:, c].long(), ignore_index=IGN))
    loss = torch.stack(losses).mean()
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return loss, grads


def make(m, d, c, k, dtype=torch.float32, scale=0.3, bias=True):
    h = torch.randn(m, d).to(dtype).requires_grad_()
    w = (torch.randn(c, k, d) * scale).to(dtype).requires_grad_()
    b = torch.randn(c, k).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, k, (m, c))
    return h, w, b, t


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("m,c,k,chunk,bias", [(1, 1, 8192, None, True), (37, 3, 1000, 8, True),
                                               (64, 1, 777, 64, False), (100, 3, 4099, 33, True),
                                               (9, 1, 70001, 4, True)])  # K over one tile: the two-pass row kernel
def test_matches_float64(triton_path, m, c, k, chunk, bias):
    h, w, b, t = make(m, 24, c, k, bias=bias)
    if m > 4:
        t[3] = IGN  # a fully ignored row
        t[5, 0] = IGN  # ignored in one codebook only
    loss, acc = linear_cross_entropy(h, w, b, t, chunk=chunk)
    loss64, grads64 = ref64(h, w, b, t)
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    for g, g64 in zip(grads, grads64):
        assert g.dtype == torch.float32 and rel(g, g64) < 1e-5
    _, acc_ref = linear_cross_entropy_ref(h, w, b, t)
    torch.testing.assert_close(acc, acc_ref)


def test_accuracy_counts_hits(triton_path):
    h, w, b, t = make(50, 16, 2, 300, bias=False)
    logits = torch.einsum("md,ckd->mck", h, w)
    t[:20] = logits[:20].argmax(-1)  # 20 certain hits per codebook
    t[45:] = IGN
    _, acc = linear_cross_entropy(h, w, None, t, chunk=16)
    expect = ((logits.argmax(-1) == t) & (t != IGN)).sum(0).float() / 45
    torch.testing.assert_close(acc, expect)
    assert bool((acc >= 20 / 45).all())


def test_bf16_within_twice_pytorch_error(triton_path):
    h, w, b, t = make(96, 32, 1, 2000, dtype=torch.bfloat16)
    loss, _ = linear_cross_entropy(h, w, b, t, chunk=32)
    grads = torch.autograd.grad(loss, (h, w, b))
    pt_loss, _ = linear_cross_entropy_ref(h, w, b, t)  # PyTorch's own bf16 path
    pt_grads = torch.autograd.grad(pt_loss, (h, w, b))
    loss64, grads64 = ref64(h, w, b, t)
    assert abs(loss.item() - loss64.item()) <= 2 * abs(pt_loss.item() - loss64.item()) + 1e-6
    for g, pg, g64 in zip(grads, pt_grads, grads64):
        assert g.dtype == torch.bfloat16
        assert (g.double() - g64).abs().max() <= 2 * (pg.double() - g64).abs().max()


def test_extreme_logits_stay_finite(triton_path):
    h, w, b, t = make(20, 16, 2, 513, scale=300.0)  # logits of magnitude ~ 1e4
    loss, _ = linear_cross_entropy(h, w, b, t, chunk=7)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    loss64, grads64 = ref64(h, w, b, t)
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    for g, g64 in zip(grads, grads64):
        assert rel(g, g64) < 1e-4


def test_grad_scales_with_upstream(triton_path):
    h, w, b, t = make(10, 8, 1, 100)
    loss, _ = linear_cross_entropy(h, w, b, t, chunk=4)
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    (g3,) = torch.autograd.grad(3 * loss, h)
    torch.testing.assert_close(g3, 3 * g1)


def test_validation(triton_path):
    h, w, b, t = make(10, 8, 2, 50)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\)"):
        linear_cross_entropy(h, w, b, t.masked_fill(t == t[0, 0], 50))
    with pytest.raises(ValueError, match=r"targets must lie"):
        linear_cross_entropy(h, w, b, torch.full_like(t, -1))
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(h, w, b, t[:, :1])
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[..., :7], b, t)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(h, w, b[:, :49], t)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_cross_entropy(h.half(), w, b, t)
    with pytest.raises(ValueError, match="int32 or int64"):
        linear_cross_entropy(h, w, b, t.float())


def test_chunk_rule():
    """Memory only: as many rows as fit 64 MiB of logits; one chunk when all do."""
    assert choose_chunk(16384, 8192, 2) == 4096  # the paper's head in bf16: 4 chunks of 64 MiB
    assert choose_chunk(4000, 8192, 2) == 4000  # 62.5 MiB of logits: one chunk
    assert choose_chunk(100, 8192, 4) == 100
    assert choose_chunk(10**6, 8192, 4) == (64 << 20) // (8192 * 4)
    assert choose_chunk(10**6, 10**7, 4) == 64  # never below 64 rows


@pytest.mark.parametrize("codebooks", [1, 2])
def test_training_step_same_with_fused_head_on_and_off(monkeypatch, codebooks):
    monkeypatch.delenv("BESTRQ2_KERNELS", raising=False)
    results = []
    for head in ("reference", "triton"):
        torch.manual_seed(7)
        ops = {op: "triton" for op in ("rpq", "gather", "scatter", "block")} | {"head": head}
        cfg = BestRQ2Config.preset("tiny", encoder_depth=2, predictor_depth=1, kernels=ops,
                                   num_codebooks=codebooks, codebook_size=2048)
        model = BestRQ2(cfg)
        wave = torch.randn(2, 50_000) * 0.1
        torch.manual_seed(8)
        out = model(wave)
        out.loss.backward()
        results.append((out.loss.detach(), out.accuracy, {k: p.grad for k, p in model.named_parameters()}))
    (la, aa, ga), (lb, ab, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ab, aa)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


def test_torch_row_step_matches_float64():
    """The same chunked algorithm with the row step in PyTorch ops (the low-memory CPU path)."""
    h, w, b, t = make(70, 24, 2, 1001)
    t[4] = IGN
    loss, acc = linear_cross_entropy(h, w, b, t, chunk=16, impl="torch")
    loss64, grads64 = ref64(h, w, b, t)
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    for g, g64 in zip(torch.autograd.grad(loss, (h, w, b)), grads64):
        assert rel(g, g64) < 1e-5
    torch.testing.assert_close(acc, linear_cross_entropy_ref(h, w, b, t)[1])
    with pytest.raises(ValueError, match="impl must be"):
        linear_cross_entropy(h, w, b, t, impl="cuda")
