"""Attention backends against a float64 reference, ragged batches, and the dispatch rules.

Backends checked on CPU: sdpa, math and triton (the Triton kernel under TRITON_INTERPRET=1).
flash_attn / fa4 / SDPA-flash / cuDNN need CUDA and run in the GPU suite (tests/test_gpu.py).
Tolerances: float32 against float64, 2e-5 relative to the largest element (forward and grads).
"""
import warnings
from types import SimpleNamespace

import pytest
import torch

from bestrq2 import BestRQ2, BestRQ2Config, BestRQ2Encoder
from conftest import aten_ops
from bestrq2 import attention as A
from bestrq2.kernels.attention import attention_ref, qkv_attention_ref, triton_attention, triton_qkv_attention

CPU_BACKENDS = ["sdpa", "math", "triton"]


def ragged_inputs(lengths, h=3, d=64, dtype=torch.float32):
    b, n = len(lengths), max(lengths)
    q, k, v = (torch.randn(b, n, h, d).to(dtype).requires_grad_() for _ in range(3))
    pad = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]
    return q, k, v, pad


def ref_per_clip(q, k, v, lengths):
    """float64 reference, each clip alone on its valid tokens."""
    outs = []
    for i, n in enumerate(lengths):
        qi, ki, vi = (t[i, :n].double().transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        p = torch.softmax(qi @ ki.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        outs.append((p @ vi).transpose(0, 1))
    return outs


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths", [[16, 16], [5, 33, 1, 20], [128], [256, 3]])
@pytest.mark.parametrize("head_dim", [64, 32])
def test_backend_matches_float64(backend, lengths, head_dim):
    q, k, v, pad = ragged_inputs(lengths, d=head_dim)
    out = A.dense_attention(q, k, v, backend, pad if pad.any() else None)
    refs = ref_per_clip(q, k, v, lengths)
    g = torch.randn_like(out)
    for i, n in enumerate(lengths):
        assert rel(out[i, :n], refs[i]) < 2e-5
    # grads: the loss only sees valid rows, as in the model
    valid = ~pad
    loss = (out * g)[valid].sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    refs64 = ref_per_clip(q64, k64, v64, lengths)
    loss64 = sum((r * g[i, :n].double()).sum() for i, (r, n) in enumerate(zip(refs64, lengths)))
    grads64 = torch.autograd.grad(loss64, (q64, k64, v64))
    for gr, g64 in zip(grads, grads64):
        assert rel(gr[valid], g64[valid]) < 2e-5
        if bool(pad.any()):  # padding is never attended and its outputs are unused: no gradient at all
            assert float(gr[pad].abs().max()) == 0.0


@pytest.mark.parametrize("head_dim", [64, 48])
def test_triton_kernel_bf16_within_twice_sdpa_error(head_dim):
    lengths = [40, 7]
    q, k, v, pad = ragged_inputs(lengths, d=head_dim, dtype=torch.bfloat16)
    out = A.dense_attention(q, k, v, "triton", pad)
    ref = A.dense_attention(q, k, v, "sdpa", pad)  # PyTorch's own bf16 attention
    exact = ref_per_clip(q, k, v, lengths)
    for i, n in enumerate(lengths):
        err_k = (out[i, :n].double() - exact[i]).abs().max()
        err_t = (ref[i, :n].double() - exact[i]).abs().max()
        assert err_k <= 2 * err_t + 1e-6


def test_triton_varlen_direct_and_limits():
    lens = [3, 1, 70]
    cu = torch.tensor([0, 3, 4, 74], dtype=torch.int32)
    qkv = torch.randn(74, 3, 2, 64)
    q, k, v = qkv.unbind(1)  # strided views of a packed qkv, as the model passes them
    out = triton_attention(q, k, v, cu, max(lens))
    torch.testing.assert_close(out.double(), attention_ref(q.double(), k.double(), v.double(), cu), rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="256"):
        triton_attention(q, k, v, cu, 300)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(74, 2, 160)
        triton_attention(big, big, big, cu, 70)


def _cu(lens):
    return torch.nn.functional.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lens,cfg", [([3, 1, 70], None),  # one tile per sequence: one backward kernel
                                      ([130, 5], None),  # the two-kernel backward
                                      ([70, 1, 33], "32,32,4,1")])  # several row blocks: bias-grad partials
def test_packed_qkv_attention_matches_float64(with_bias, lens, cfg, monkeypatch):
    """The model's form (qkv linear output without its bias, the bias fused in the kernels): output, qkv's
    gradient (one [T, 3, H, Dh] tensor) and the bias gradient against float64, float32 tolerance 2e-5."""
    if cfg:
        monkeypatch.setenv("BESTRQ2_ATTN_CFG", cfg)
    h, d = 2, 48
    qkv = torch.randn(sum(lens), 3, h, d, requires_grad=True)
    bias = (torch.randn(3 * h * d) * 0.5).requires_grad_() if with_bias else None
    cu = _cu(lens)
    out = triton_qkv_attention(qkv, bias, cu, max(lens))
    g = torch.randn_like(out)
    inputs = (qkv, bias) if with_bias else (qkv,)
    grads = torch.autograd.grad(out, inputs, g)
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = qkv_attention_ref(x64[0], x64[1] if with_bias else None, cu)
    grads64 = torch.autograd.grad(ref, x64, g.double())
    assert rel(out, ref) < 2e-5
    assert grads[0].shape == qkv.shape and grads[0].is_contiguous()
    for gr, g64 in zip(grads, grads64):
        assert gr.dtype == torch.float32 and gr.shape == g64.shape
        assert rel(gr, g64) < 2e-5
    if with_bias:  # the key bias shifts each query's scores by a constant, which softmax cancels: the kernels
        # skip it (the output above matched a reference that adds it) and its gradient is exactly zero
        db = grads[1].view(3, -1)
        assert float(db[1].abs().max()) == 0.0 and float(db[0].abs().max()) > 0 and float(db[2].abs().max()) > 0
        assert float(grads64[1].view(3, -1)[1].abs().max()) < 1e-9 * float(grads64[1].abs().max())


@pytest.mark.parametrize("lens,cfg", [([3, 1, 70], None), ([70, 1, 33], "32,32,4,1")])
def test_attention_backward_writes_every_empty_buffer(lens, cfg, monkeypatch):
    """Every float buffer the launchers take from torch.empty is written in full: poisoned with NaN at
    allocation, the bias gradient (the one-tile kernel writes the key slot's zeros itself, no memset
    before) and qkv's gradient come out finite and equal to a run without the poison."""
    if cfg:
        monkeypatch.setenv("BESTRQ2_ATTN_CFG", cfg)
    h, d = 2, 48
    qkv = torch.randn(sum(lens), 3, h, d, requires_grad=True)
    bias = (torch.randn(3 * h * d) * 0.5).requires_grad_()
    cu = _cu(lens)

    def grads():
        out = triton_qkv_attention(qkv, bias, cu, max(lens))
        return torch.autograd.grad(out, (qkv, bias), torch.ones_like(out))

    clean = grads()
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    dirty = grads()
    monkeypatch.setattr(torch, "empty", real_empty)
    for a, b in zip(clean, dirty):
        assert bool(torch.isfinite(b).all()) and torch.equal(a, b)


def test_packed_qkv_attention_bf16_within_twice_sdpa_error():
    """bf16 qkv with a float32 bias (the model under autocast): the output within 2x the error of PyTorch's
    own bf16 path ((qkv + bias) in bf16, SDPA) against float64; gradients in the inputs' dtypes."""
    lens, h, d = [40, 7], 2, 64
    qkv = torch.randn(sum(lens), 3, h, d).bfloat16().requires_grad_()
    bias = (torch.randn(3 * h * d) * 0.5).requires_grad_()
    cu = _cu(lens)
    out = triton_qkv_attention(qkv, bias, cu, max(lens))
    exact = qkv_attention_ref(qkv.detach().double(), bias.detach().double(), cu)
    torch_bf16 = qkv_attention_ref(qkv.detach(), bias.detach(), cu)  # bias added in bf16, bf16 matmuls
    assert out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() <= 2 * (torch_bf16.double() - exact).abs().max() + 1e-6
    dqkv, db = torch.autograd.grad(out, (qkv, bias), torch.randn_like(out))
    assert dqkv.dtype == torch.bfloat16 and db.dtype == torch.float32


def test_packed_qkv_attention_checks_its_input():
    cu = _cu([4])
    with pytest.raises(ValueError, match=r"\[T, 3, H, Dh\]"):
        triton_qkv_attention(torch.randn(4, 2, 2, 16), None, cu, 4)
    with pytest.raises(ValueError, match="= 96 values"):
        triton_qkv_attention(torch.randn(4, 3, 2, 16), torch.randn(95), cu, 4)
    with pytest.raises(ValueError, match="256"):
        triton_qkv_attention(torch.randn(4, 3, 2, 16), None, cu, 300)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_module_triton_form_equals_sdpa(padded):
    """``Attention`` on the Triton backend (qkv linear without bias, bias fused, packed gradient) against the
    SDPA form: the same output and parameter gradients, float32; its backward stacks no three grads and sums
    no bias gradient over qkv's gradient (the SDPA form's backward does both)."""
    from bestrq2.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(64, 2)
    torch.nn.init.normal_(attn.qkv.bias, std=0.5)
    x = torch.randn(3, 20, 64)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    if padded:
        pad[1, 13:] = True
        pad[2, 4:] = True
    g = torch.randn(3, 20, 64)
    results = {}
    for backend in ("sdpa", "triton"):
        attn.zero_grad()
        out = attn(x, pad if padded else None, backend)
        valid = ~pad
        loss = (out * g)[valid].sum()
        ops = aten_ops(loss.backward)
        results[backend] = (out[valid].detach(), [p.grad.clone() for p in attn.parameters()], ops)
    ref_out, ref_grads, ref_ops = results["sdpa"]
    out, grads, ops = results["triton"]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg, rtol=1e-5, atol=1e-5)
    assert "aten.stack" in ref_ops and "aten.stack" not in ops
    sums = lambda ops: sum(op in ("aten.sum", "aten.sum.dim_IntList") for op in ops)  # noqa: E731
    assert sums(ops) < sums(ref_ops)


def test_dispatch_rules(monkeypatch):
    x = torch.randn(2, 8, 64)
    monkeypatch.delenv("BESTRQ2_ATTENTION", raising=False)
    assert A.resolve("auto", x, 64, 8) == "sdpa"  # CPU
    with pytest.raises(ValueError, match="needs CUDA"):
        A.resolve("flash_attn", x, 64, 8)
    with pytest.raises(ValueError, match="one of"):
        A.resolve("xformers", x, 64, 8)
    with pytest.raises(ValueError, match="256 tokens"):
        A.resolve("triton", x, 64, 300)
    monkeypatch.setenv("BESTRQ2_ATTENTION", "math")  # the variable wins over the config, folded in at build
    cfg = BestRQ2Config(kernels={"attention": "sdpa"})
    assert cfg.resolved().kernels["attention"] == "math"
    assert BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1)).config.kernels["attention"] == "math"
    with pytest.raises(ValueError, match=r"kernels\['attention'\] must be one of"):
        BestRQ2Config(kernels={"attention": "fast"})
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        A.resolve("triton", x, 64, 8)


def test_auto_falls_back_with_one_warning(monkeypatch):
    """On CUDA with flash_attn installed but fp32 activations, auto warns once and uses SDPA."""
    monkeypatch.delenv("BESTRQ2_ATTENTION", raising=False)
    monkeypatch.setattr(A, "_has", lambda mod: mod == "flash_attn")
    monkeypatch.setattr(A, "_warned", set())
    fake_cuda = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    with pytest.warns(UserWarning, match="flash_attn takes fp16/bf16"):
        assert A.resolve("auto", fake_cuda, 64, 128) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.resolve("auto", fake_cuda, 64, 128) == "sdpa"  # no second warning
    bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert A.resolve("auto", bf16, 64, 128) == "flash_attn"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encoder_padded_batch_equals_single_per_backend(backend):
    torch.manual_seed(0)
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2, kernels={"attention": backend})).eval()
    lengths = torch.tensor([160_000, 37_000, 9_375])
    wave = torch.randn(3, 160_000) * 0.1
    frames = enc(wave, lengths)
    assert enc.encoder.attention_backend == backend
    for b, n in enumerate(lengths.tolist()):
        alone = enc(wave[b: b + 1, :n])
        torch.testing.assert_close(frames[b: b + 1, : alone.shape[1]], alone, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("one_stage", [False, True])
def test_ragged_per_sample_masks_equal_single_runs(backend, one_stage):
    torch.manual_seed(1)
    cfg = BestRQ2Config.preset("tiny", encoder_depth=2, predictor_depth=1, mask_mode="per_sample",
                               mask_equal_counts=False, kernels={"attention": backend}, one_stage=one_stage,
                               codebook_size=512)
    model = BestRQ2(cfg).eval()
    wave = torch.randn(4, 40_000) * 0.1
    out = model(wave)
    counts = out.mask.sum(1)
    assert len(set(counts.tolist())) > 1  # really ragged
    total, weighted = 0, 0.0
    for b in range(4):
        alone = model(wave[b: b + 1], mask=out.mask[b])
        m = int(counts[b])
        valid = out.targets[b, :, 0] != -100
        assert int(valid.sum()) == m
        torch.testing.assert_close(out.hidden[b, valid], alone.hidden[0], rtol=1e-4, atol=2e-5)
        assert torch.equal(out.targets[b, valid], alone.targets[0])
        total += m
        weighted += m * alone.loss.item()
    assert abs(out.loss.item() - weighted / total) < 1e-4
    out.loss.backward()  # the ragged path trains
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0


def test_auto_reads_measured_wins(tmp_path):
    """``auto`` takes the Triton kernel only where bench.gpu_probe measured it ahead of SDPA on this card
    (by the margin), at the smallest measured length covering the sequence, for the right pass."""
    from bench.gpu_probe import wins_from_rows, write_wins
    from bestrq2.attention import WIN_MARGIN, measured_winner

    meta = dict(date="2026-12-02T00:00:00Z", torch="2.11", triton="3.6")
    rows = [dict(N=64, cfg="default", fwd_ms=0.05, fwdbwd_ms=0.30, sdpa_fwd_ms=0.08, sdpa_fwdbwd_ms=0.30, **meta),
            dict(N=64, cfg="64,64,4,2", fwd_ms=0.01, fwdbwd_ms=0.01, sdpa_fwd_ms=0.08, sdpa_fwdbwd_ms=0.3, **meta),
            dict(N=128, cfg="default", fwd_ms=0.10, fwdbwd_ms=0.50, sdpa_fwd_ms=0.06, sdpa_fwdbwd_ms=0.60, **meta)]
    entries = wins_from_rows(rows)
    assert len(entries) == 4  # the default config only: what the model runs
    table = write_wins(tmp_path / "wins.json", "Card X", entries)
    table = write_wins(tmp_path / "wins.json", "Card Y", [])  # other cards' entries stay
    assert set(table) == {"Card X", "Card Y"}
    win = lambda n, training, card="Card X", dtype=torch.bfloat16, d=64: measured_winner(  # noqa: E731
        card, d, n, dtype, training, table)
    assert win(64, False) == "triton" and win(40, False) == "triton"  # 0.08 / 0.05 = 1.6x forward
    assert win(64, True) is None  # forward + backward: a tie is not a win (margin WIN_MARGIN)
    assert WIN_MARGIN > 1.0
    assert win(128, False) is None and win(100, True) == "triton"  # 0.6 / 0.5 = 1.2x when training
    assert win(129, True) is None  # longer than anything measured
    assert win(64, False, card="Card Y") is None and win(64, False, card="Card Z") is None
    assert win(64, False, dtype=torch.float16) is None and win(64, False, d=32) is None


def test_wins_probe_runs_and_writes_the_table(tmp_path, capsys):
    """``bench.gpu_probe`` end to end on a tiny CPU run (interpreter, wall clock): both forms timed, the Triton
    output checked against SDPA's, a CSV row per config and the wins entries written where it is told."""
    import csv
    import json

    from bench.gpu_probe import main

    out, wins = tmp_path / "probe.csv", tmp_path / "wins.json"
    assert main(["--smoke", "--lengths", "16", "--tokens", "32", "--configs", "default", "--out", str(out),
                 "--wins", "--wins-file", str(wins)]) == 0
    printed = capsys.readouterr().out
    assert "failed" not in printed, printed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["form"] == "qkv+bias" and float(rows[0]["max_abs_diff"]) < 0.05
    entries = json.loads(wins.read_text())["cpu (smoke)"]
    assert {e["pass"] for e in entries} == {"forward", "train"} and all(e["triton_over_sdpa"] > 0 for e in entries)


def test_shipped_wins_table_is_well_formed():
    """The table auto reads is valid JSON of the shape measured_winner takes (empty until a GPU measured it)."""
    import json

    from bestrq2.attention import WINS_FILE, measured_winner

    table = json.loads(WINS_FILE.read_text())
    for card, entries in table.items():
        for e in entries:
            assert {"max_len", "head_dim", "dtype", "pass", "triton_over_sdpa"} <= set(e) and e["pass"] in ("forward", "train")
        measured_winner(card, 64, 128, torch.bfloat16, True, table)


def test_equal_cu_seqlens_kept_and_built_inline_while_compiling():
    """The equal-length cu_seqlens: 0, n, ..., b n, one tensor per (b, n, device) kept across calls (a normal
    tensor even when first built under inference_mode); under torch.compile built in the graph, not kept."""
    from bestrq2.kept import kept

    A._CU_SEQLENS.clear()
    with torch.inference_mode():
        first = A._equal_cu_seqlens(3, 5, torch.device("cpu"))
    assert first.tolist() == [0, 5, 10, 15] and first.dtype == torch.int32 and not first.is_inference()
    assert A._equal_cu_seqlens(3, 5, torch.device("cpu")) is first
    assert A._equal_cu_seqlens(2, 5, torch.device("cpu")).tolist() == [0, 5, 10]
    cache: dict = {}
    traced = torch.compile(lambda x: x + kept(cache, ("k",), x.device, lambda: torch.ones(2)), backend="eager",
                           fullgraph=True)
    assert traced(torch.zeros(2)).tolist() == [1.0, 1.0] and cache == {}
    assert kept(cache, ("k",), torch.device("cpu"), lambda: torch.ones(2)) is cache[("k",)]
