"""Encoder precision: fp32 by default, bf16 on request or where the hardware runs it fast ("auto"),
with the frontend and the positions in float32 and frames returned in float32; CPU bf16 training."""
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import bestrq2.precision as P
from bestrq2 import BestRQ2Config, BestRQ2Encoder
from bestrq2.cli import main
from bestrq2.train import TrainConfig, pretrain


def test_resolve_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert P.resolve("fp32", cpu)[0] is None and P.resolve("fp32", cuda)[0] is None
    assert P.resolve("bf16", cpu)[0] == torch.bfloat16 and P.resolve("auto", cuda)[0] == torch.bfloat16
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: "AMX")
    assert P.resolve("auto", cpu) == (torch.bfloat16, "bf16 (auto: this CPU has AMX)")
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: None)
    assert P.resolve("auto", cpu)[0] is None and "no bf16 units" in P.resolve("auto", cpu)[1]
    assert "slow" in P.resolve("bf16", cpu)[1]
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        BestRQ2Encoder(BestRQ2Config.preset("tiny"), precision="half")


def test_bf16_encoder_keeps_the_frontend_in_fp32_and_stays_close(monkeypatch):
    torch.manual_seed(0)
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2))
    wave = torch.randn(2, 60_000) * 0.1
    with torch.no_grad():
        ref = enc(wave)
        assert enc.precision == "fp32" and torch.equal(enc.set_precision("fp32")(wave), ref)
        out = enc.set_precision("bf16")(wave)
        spec_seen = []
        monkeypatch.setattr(type(enc.frontend), "forward",
                            lambda self, w, _f=type(enc.frontend).forward: spec_seen.append(_f(self, w)) or spec_seen[-1])
        enc(wave)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 3e-2  # bf16 rounding (8 bits of mantissa) through 2 blocks, not garbage
    assert spec_seen and spec_seen[0].dtype == torch.float32
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: None)  # "auto" on a CPU without bf16 units: fp32
    with torch.no_grad():
        assert torch.equal(enc.set_precision("auto")(wave), ref)


def test_cli_precision_and_cpu_bf16_training(tmp_path, capsys):
    BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1)).save_pretrained(tmp_path / "enc")
    wav = tmp_path / "x.wav"
    sf.write(wav, (np.random.default_rng(0).standard_normal(20_000) * 0.1).astype(np.float32), 16_000)
    assert main(["embed", str(wav), "--model", str(tmp_path / "enc"), "--precision", "fp32"]) == 0
    assert "precision: fp32 (asked)" in capsys.readouterr().out
    assert main(["embed", str(wav), "--model", str(tmp_path / "enc"), "--precision", "bf16", "--cuda-graphs", "off"]) == 0
    assert "precision: bf16" in capsys.readouterr().out
    res = pretrain(TrainConfig(preset="tiny", steps=2, batch_size=2, seconds=1.0, out=str(tmp_path / "run"),
                               num_workers=0, progress=False, precision="bf16"))
    assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))
    with pytest.raises(ValueError, match="--precision"):
        TrainConfig(precision="fp8").validate()


def _bf16_frames_per_call_cast(enc, wave):
    """The bf16 frames as plain autocast gives them: every linear casts its float32 weight per call."""
    orig = P.CastWeights.run
    try:
        P.CastWeights.run = lambda self, module, dtype, *args, pack=True: module(*args)
        with torch.no_grad():
            return enc(wave)
    finally:
        P.CastWeights.run = orig


def test_bf16_weights_cast_once_same_frames_and_error(monkeypatch):
    """The bf16 encoder casts (and on a CPU with oneDNN, prepacks) its linear weights once. Without
    prepacking the frames are bit-identical to autocast's per-call cast; with it, their error against a
    float64 copy stays within 2x that of the per-call cast."""
    import copy

    torch.manual_seed(0)
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2), precision="bf16")
    wave = torch.randn(3, 41_000) * 0.1
    ref64 = copy.deepcopy(enc).double().set_precision("fp32")(wave.double())
    per_call = _bf16_frames_per_call_cast(enc, wave)
    with torch.no_grad():
        fast = enc(wave)
    err = lambda out: float((out.double() - ref64).abs().max())  # noqa: E731
    assert fast.dtype == torch.float32 and fast.shape == ref64.shape
    assert 0 < err(per_call) and err(fast) <= 2 * err(per_call), (err(fast), err(per_call))
    assert bool(enc._cast._packed) == P.packed_linear_available()
    monkeypatch.setattr(P, "packed_linear_available", lambda dtype=None: False)  # the CUDA-style path: functional_call
    enc._cast.clear()
    with torch.no_grad():
        assert torch.equal(enc(wave), per_call)
    assert enc._cast._weights and not enc._cast._packed


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_weight_cache_follows_weight_changes(monkeypatch, packed):
    """Loading other weights or changing one in place remakes the cached copies: the frames are those of
    the new weights, never stale ones."""
    if packed and not P.packed_linear_available():
        pytest.skip("this torch build has no oneDNN prepacked linear")
    monkeypatch.setattr(P, "packed_linear_available", lambda dtype=None: packed)
    torch.manual_seed(1)
    a = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1), precision="bf16")
    b = BestRQ2Encoder(a.config, precision="bf16")
    wave = torch.randn(2, 20_000) * 0.1
    with torch.no_grad():
        out_a, out_b = a(wave), b(wave)
        assert not torch.equal(out_a, out_b)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(wave), out_b)
        a.encoder.blocks[0].mlp.fc1.weight.mul_(2.0)
        changed = a(wave)
    assert not torch.equal(changed, out_b)
    torch.testing.assert_close(changed, _bf16_frames_per_call_cast(a, wave), rtol=0, atol=0.05)


def test_fp32_inference_on_prepacked_weights(monkeypatch):
    """Float32 inference on a CPU runs the linears on weights prepacked once for oneDNN: frames within the
    float32 bound of the plain ``F.linear`` path (error against a float64 copy at most 2x the plain path's,
    plus one rounding), the cache follows weight changes, a copied encoder starts with an empty cache,
    training (gradients on) and ``prepack_cpu_weights = False`` never touch it."""
    import copy

    from conftest import F32_ROUNDING, float64_twin

    if not P.packed_linear_available(torch.float32):
        pytest.skip("this torch build has no oneDNN prepacked float32 linear")
    torch.manual_seed(2)
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2))
    wave = torch.randn(3, 37_000) * 0.1
    with torch.no_grad():
        exact = float64_twin(enc)(wave.double())
        packed = enc(wave)
        assert enc._cast._packed and all(w.dtype == torch.float32 for w, _ in enc._cast._packed.values())
        enc.prepack_cpu_weights = False
        enc._cast.clear()
        plain = enc(wave)
        assert not enc._cast._packed
        enc.prepack_cpu_weights = True
    scale = float(exact.abs().max())
    e_packed, e_plain = (float((o.double() - exact).abs().max()) / scale for o in (packed, plain))
    assert e_plain < 1e-5 and e_packed <= 2 * e_plain + F32_ROUNDING, (e_packed, e_plain)

    twin = copy.deepcopy(enc)  # the packed tensors are not copied; the copy packs its own
    assert not twin._cast._packed
    with torch.no_grad():
        torch.testing.assert_close(twin(wave), packed, rtol=0, atol=0)
        enc.encoder.blocks[0].mlp.fc1.weight.mul_(2.0)  # in place: the cache must notice
        changed = enc(wave)
        enc.prepack_cpu_weights = False
        changed_plain = enc(wave)
    assert not torch.equal(changed, packed)
    torch.testing.assert_close(changed, changed_plain, rtol=0, atol=1e-5 * float(changed_plain.abs().max()))

    enc.prepack_cpu_weights = True
    enc._cast.clear()
    tok = enc.tokens(wave)  # gradients on: the training path, plain modules
    assert tok.requires_grad and not enc._cast._packed


def test_cuda_graph_mode_is_checked_and_off_the_cpu_path():
    """``cuda_graphs`` takes auto | on | off; on a CPU encoder the call never goes near a graph."""
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        BestRQ2Encoder(BestRQ2Config.preset("tiny"), cuda_graphs="yes")
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1), cuda_graphs="on")
    with torch.no_grad():
        enc(torch.randn(1, 20_000) * 0.1)
    assert enc._graphed.captures == 0 and not enc._use_graph(1, [20_000], 20_000)


def test_graph_cache_bookkeeping_with_a_stand_in_graph(monkeypatch):
    """GraphedFrames' cache logic on CPU with a stand-in for torch.cuda's graph API (the real capture is
    tested by the cuda suite): one capture per (shape, key), least recently used evicted past ``most``,
    the output cloned out of the static buffer, normal tensors even when called in inference mode."""
    import contextlib

    import bestrq2.cuda_graphs as G

    replays = []

    class FakeGraph:
        def replay(self):
            replays.append(1)

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    fake = type("FakeCuda", (), dict(Stream=FakeStream, current_stream=FakeStream, CUDAGraph=FakeGraph,
                                     stream=lambda s: contextlib.nullcontext(), graph=lambda g: contextlib.nullcontext()))
    monkeypatch.setattr(G.torch, "cuda", fake)
    calls = []
    fn = lambda w: calls.append(w.shape) or w * 2  # noqa: E731
    g = G.GraphedFrames(most=2)
    a = torch.ones(1, 4)
    with torch.inference_mode():
        out = g(fn, a, ("k",))
    assert not out.is_inference() and torch.equal(out, a * 2) and g.captures == 1 and len(calls) == 3  # 2 warm-ups
    again = g(fn, a, ("k",))
    assert g.captures == 1 and len(replays) == 2 and again.data_ptr() != out.data_ptr()
    g(fn, a, ("other weights",))
    g(fn, torch.ones(2, 4), ("k",))
    assert g.captures == 3 and len(g.graphs) == 2  # the first entry was evicted
    g(fn, a, ("k",))
    assert g.captures == 4
    # first_eager (the encoder's "auto"): a shape's first call runs eagerly, its second is captured; shapes
    # that never repeat are never captured
    g, calls[:], replays[:] = G.GraphedFrames(most=2, remember=3), [], []
    for n in range(5, 10):
        assert torch.equal(g(fn, torch.ones(1, n), ("k",), first_eager=True), torch.ones(1, n) * 2)
    assert g.captures == 0 and len(calls) == 5 and not replays and len(g.seen) == 3  # the oldest forgotten
    g(fn, torch.ones(1, 9), ("k",), first_eager=True)
    assert g.captures == 1 and len(calls) == 8 and len(replays) == 1 and len(g.seen) == 2
    g(fn, torch.ones(1, 9), ("k",), first_eager=True)
    assert g.captures == 1 and len(replays) == 2
    g(fn, torch.ones(1, 5), ("k",), first_eager=True)  # forgotten: eager again
    assert g.captures == 1 and len(calls) == 9
    g(fn, torch.ones(1, 9), ("new weights",), first_eager=True)
    assert g.captures == 1 and len(calls) == 10
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        G.check_mode("always")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_keeps_a_call_without_bias_bias_free(dtype):
    """A linear called without its bias (the Triton path's blocks leave fc1's, proj's and fc2's to the fused op
    after them) gets none on the prepacked weights either; a call with it gets the module's bias."""
    if not P.packed_linear_available(dtype):
        pytest.skip(f"this torch build has no oneDNN prepacked {dtype} linear")

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 24)

        def forward(self, x):
            return F.linear(x, self.lin.weight), self.lin(x)

    torch.manual_seed(0)
    m = Two()
    with torch.no_grad():
        m.lin.bias.normal_()
        x = torch.randn(5, 32)
        bare, full = P.CastWeights().run(m, dtype, x)
        w, b = m.lin.weight.to(dtype).float(), m.lin.bias.to(dtype).float()
        xr = x.to(dtype).float()
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)
    torch.testing.assert_close(bare.float(), xr @ w.t(), **tol)
    torch.testing.assert_close(full.float(), xr @ w.t() + b, **tol)


def test_cpu_bf16_attention_with_gradients_runs_in_float32(monkeypatch):
    """On a CPU, bf16 attention that needs a gradient (training) runs SDPA on float32 copies (torch's bf16 CPU
    backward is the slow one) and is cast back: the same output as float32 SDPA rounded to bf16, gradients
    within 2x the bf16 kernel's own error against float64. Without gradients it stays in bf16."""
    import bestrq2.attention as A

    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, 70, 3, 16, generator=g) for _ in range(3)]
    grad_out = torch.randn(2, 70, 3, 16, generator=g).bfloat16()
    if A.cpu_bf16_sdpa_works():
        with torch.no_grad():
            A.dense_attention(*(t.bfloat16() for t in base), "sdpa")
        assert seen == [torch.bfloat16]
    q, k, v = (t.bfloat16().requires_grad_() for t in base)
    out = A.dense_attention(q, k, v, "sdpa")
    assert seen[-1] == torch.float32 and out.dtype == torch.bfloat16
    ref = sdpa(*(t.detach().float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=0, atol=0)
    out.backward(grad_out)
    exact = [t.double().requires_grad_() for t in base]
    sdpa(*(t.transpose(1, 2) for t in exact)).transpose(1, 2).backward(grad_out.double())
    if A.cpu_bf16_sdpa_works():  # the bf16 kernel's own gradient error, the bound
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in base)
        sdpa(*(t.transpose(1, 2) for t in (qb, kb, vb))).transpose(1, 2).backward(grad_out)
        for mine, theirs, e in zip((q, k, v), (qb, kb, vb), exact):
            own = (theirs.grad.double() - e.grad).abs().max()
            assert (mine.grad.double() - e.grad).abs().max() <= 2 * own + 1e-3


def test_bf16_attention_where_cpu_sdpa_cannot_run_it(monkeypatch):
    """torch 2.13's CPU attention raises on bf16 from 64 tokens when the CPU has AMX but ATen runs a narrower
    path (ATEN_CPU_CAPABILITY=default / avx2). Where the probe says so, bf16 attention runs in float32 (with
    gradients) and is cast back; and a whole bf16 encoder runs under ATEN_CPU_CAPABILITY=default."""
    import subprocess
    import sys

    import bestrq2.attention as A

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 70, 3, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[1, 50:] = True
    monkeypatch.setattr(A, "_CPU_BF16_SDPA", [False])
    out = A.dense_attention(q, k, v, "sdpa", pad)
    ref = F.scaled_dot_product_attention(*(t.detach().float().transpose(1, 2) for t in (q, k, v)),
                                         attn_mask=(~pad)[:, None, None, :]).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=0, atol=0)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()
    code = ("import torch; from bestrq2 import BestRQ2Config, BestRQ2Encoder; "
            "e = BestRQ2Encoder(BestRQ2Config.preset('tiny', encoder_depth=1), precision='bf16').eval(); "
            "print(tuple(e(torch.randn(1, 160000) * 0.1).shape))")
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "default"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "(1, 16, 192)" in res.stdout, res.stderr[-2000:]
