"""ONNX export: dynamic batch and length, checked against the PyTorch encoder with onnxruntime on CPU.

Tolerance, against a float64 copy of the encoder: the ONNX frames' error is at most 2.5x PyTorch's own float32
error, plus one float32 rounding. The flash-attention rule's 2x is widened because the exported STFT is a
two-stage DFT in matmuls where PyTorch runs an FFT: in a frame's quietest bins its float32 rounding is about
2.4x the FFT's (official batch clip, log-mel against float64: 0.052 vs 0.022 dB at most, 0.00057 vs 0.00039 dB
on average), and the log carries that into the frames. It still catches small mistakes: one LayerNorm bias
element of the tiny encoder off by 1e-3 gave 6.9e-7 against a limit of 5.7e-7 (2.3e-7 when right)."""
import numpy as np
import pytest
import torch

from bestrq2 import BestRQ2Config, BestRQ2Encoder
from bestrq2.cli import main

import onnxruntime  # noqa: F401  (the onnx extra is a dev dependency: a missing one fails, it is not skipped)


def _perturbed(enc):
    """LayerNorm weights and biases off their init (ones, zeros), so that a norm or bias taken from the wrong
    place changes the output."""
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return enc


@pytest.fixture(scope="module", params=["fused", "portable"])
def exported(tmp_path_factory, request):
    """(a two-block tiny encoder, its ONNX export under onnxruntime): onnxruntime's fused contrib ops (the
    default) and the portable standard-op graph."""
    from bestrq2.onnx import OnnxEncoder

    torch.manual_seed(0)
    enc = _perturbed(BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2)).eval())
    path = enc.to_onnx(tmp_path_factory.mktemp("onnx") / "encoder.onnx", portable=request.param == "portable")
    return enc, OnnxEncoder(path)


def _close(enc, onnx_enc, wave, lengths=None):
    from conftest import F32_ROUNDING, float64_twin

    with torch.no_grad():
        exact = float64_twin(enc, exact_filterbank=False)(wave.double(), lengths).numpy()
        ref = enc(wave, lengths).numpy()
    out = onnx_enc(wave.numpy(), lengths)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = float(np.abs(exact).max())
    e_onnx, e_torch = float(np.abs(out - exact).max()) / scale, float(np.abs(ref - exact).max()) / scale
    assert e_torch < 1e-4 and e_onnx <= 2.5 * e_torch + F32_ROUNDING, (e_onnx, e_torch)


@pytest.mark.parametrize("batch,samples", [(1, 9375), (3, 48_000), (2, 160_000), (1, 170_000), (2, 331_234)])
def test_onnx_frames_equal_the_encoders(exported, batch, samples):
    """One graph for every batch and length; > 10 s audio cut into chunks with the short-tail rule."""
    enc, onnx_enc = exported
    _close(enc, onnx_enc, torch.randn(batch, samples) * 0.1)


def test_onnx_padded_batch_and_bad_input(exported):
    enc, onnx_enc = exported
    _close(enc, onnx_enc, torch.randn(2, 200_000) * 0.1, torch.tensor([200_000, 50_000]))
    with pytest.raises(ValueError, match="NaN"):
        onnx_enc(np.full((1, 20_000), np.nan, dtype=np.float32))


def test_cli_export_onnx(tmp_path, capsys, monkeypatch):
    """``bestrq2 export --onnx`` writes the default export; ``--onnx-portable`` asks for the portable one (the
    export itself stubbed there: the portable graph is tested through the ``exported`` fixture)."""
    from bestrq2.train import TrainConfig, pretrain

    pretrain(TrainConfig(preset="tiny", steps=1, batch_size=2, seconds=1.0, out=str(tmp_path / "run"), num_workers=0,
                         progress=False), model_cfg=BestRQ2Config.preset("tiny", encoder_depth=1, predictor_depth=1))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "enc"), "--onnx"]) == 0
    assert (tmp_path / "enc" / "encoder.onnx").is_file() and "onnxruntime's Attention op" in capsys.readouterr().out
    asked = []
    monkeypatch.setattr(BestRQ2Encoder, "to_onnx", lambda self, path, portable=False: asked.append(portable) or path)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "enc2"), "--onnx-portable"]) == 0
    assert asked == [True] and "standard ONNX ops" in capsys.readouterr().out


def test_onnx_official_layout(tmp_path, fixtures):
    """The authors' weights and position quirk (flat-index rows on clips under 10 s) survive export."""
    from bestrq2.onnx import OnnxEncoder
    from conftest import wave_of

    enc = BestRQ2Encoder.from_official(fixtures["weights"], encoder_heads=4)
    onnx_enc = OnnxEncoder(enc.to_onnx(tmp_path / "official.onnx"))
    for clip in ("short", "batch"):
        _close(enc, onnx_enc, wave_of(fixtures, clip))


def test_onnx_batches_pieces_of_equal_length(exported):
    """Equal-length pieces (clips, 10 s chunks of long clips) run as one batch of at most max_batch rows,
    and each clip's frames match the clip run alone (float32 rounding of a different GEMM batch)."""
    from bestrq2.onnx import OnnxEncoder

    _, onnx_enc = exported
    batched = OnnxEncoder.__new__(OnnxEncoder)
    batched.session, batched.max_batch, batched.workers = onnx_enc.session, 2, 1
    calls = []
    run = batched._run
    batched._run = lambda w: calls.append(w.shape) or run(w)
    lengths = torch.tensor([200_000, 50_000, 160_000, 160_000])
    wave = torch.randn(4, 200_000) * 0.1
    out = batched(wave.numpy(), lengths)
    # 10 s pieces: clip 0's first chunk, clips 2 and 3 -> 2 runs of <= 2 rows; the 40,000 and 50,000 pieces
    assert sorted(calls) == sorted([(2, 160_000), (1, 160_000), (1, 40_000), (1, 50_000)]), calls
    for i, n in enumerate(lengths.tolist()):
        alone = onnx_enc(wave[i: i + 1, :n].numpy())[0]
        np.testing.assert_allclose(out[i, : len(alone)], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
        assert not out[i, len(alone):].any()
    with pytest.raises(ValueError, match="max_batch"):
        OnnxEncoder("unused.onnx", max_batch=0)
    with pytest.raises(ValueError, match="threads"):
        OnnxEncoder("unused.onnx", threads=0)


def test_onnx_split_batches_run_at_once(exported):
    """``split_batches``: with two threads a batch of 3 runs as sub-batches of 2 and 1 on the single-threaded
    session, both at the same time (each waits at a barrier for the other: run one after the other, the first
    would time out), and gives the frames of the one-run encoder up to float32 rounding; one row stays on the
    intra-op session."""
    import threading

    from bestrq2.onnx import OnnxEncoder

    _, onnx_enc = exported
    split = OnnxEncoder(onnx_enc.path, threads=2, split_batches=True)
    whole = OnnxEncoder(onnx_enc.path, threads=2)
    one = np.random.default_rng(1).standard_normal((1, 20_000)).astype(np.float32) * 0.1
    np.testing.assert_array_equal(split(one), whole(one))
    assert split._serial is None
    wave = np.random.default_rng(0).standard_normal((3, 20_000)).astype(np.float32) * 0.1
    split(wave[:2])  # loads the single-threaded session
    barrier, rows = threading.Barrier(2, timeout=60), []
    run = split._serial.run

    def meet_then_run(names, feeds):
        rows.append(feeds["wave"].shape[0])
        barrier.wait()
        return run(names, feeds)

    split._serial.run = meet_then_run
    out, ref = split(wave), whole(wave)
    assert sorted(rows) == [1, 2] and whole._serial is None, rows
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("samples", [9375, 9999, 10_000, 48_000, 160_624])
def test_factored_stft_matches_the_frontend(samples):
    """The exported frontend's two-stage DFT against the PyTorch frontend run in float64: the same frame
    count, and its power-domain error at most twice float32 torch.stft's (with a 1e-7 floor), on a clip
    with 80 dB of dynamic range."""
    from bestrq2.frontend import LogMel
    from bestrq2.onnx import FactoredLogMel

    torch.manual_seed(samples)
    wave = torch.randn(2, samples) * 0.1
    wave[1] *= torch.logspace(-4, 0, samples)
    fe = LogMel()
    with torch.no_grad():
        exact = fe.double()(wave.double())
        ref = fe.float()(wave)
        out = FactoredLogMel(fe.window, fe.fb)(wave)
    assert out.shape == exact.shape, (out.shape, exact.shape)
    power = lambda db: 10 ** (db.double() / 10)  # noqa: E731
    scale = float(power(exact).max())
    e_out = float((power(out) - power(exact)).abs().max()) / scale
    e_ref = float((power(ref) - power(exact)).abs().max()) / scale
    assert e_out <= 2 * e_ref + 1e-7, (e_out, e_ref)


def test_wide_mlp_goes_in_two_halves(tmp_path):
    """Wide MLPs (hidden >= SPLIT_K_FROM) go to ONNX in two halves: fc1's output features and fc2's input
    features split, fc2 two half-K Gemms summed (faster in onnxruntime's GEMM), the bias on the first half
    only; both exports of an encoder with a wide MLP match the PyTorch frames."""
    import onnx

    from bestrq2.onnx import SPLIT_K_FROM, OnnxEncoder, _ExportedFrames, export_onnx

    torch.manual_seed(3)
    enc = _perturbed(BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1, mlp_ratio=12.0)).eval())
    mlp = enc.encoder.blocks[0].mlp
    assert mlp.fc2.in_features >= SPLIT_K_FROM  # 2,304 hidden features
    exp = _ExportedFrames(enc).encoder
    assert exp.mlp_parts == 2 and [f.weight.shape[0] for f in exp.fc1] == [1152, 1152]
    assert exp.fc2[0].bias is not None and exp.fc2[1].bias is None
    wave = torch.randn(2, 48_000) * 0.1
    _close(enc, OnnxEncoder(enc.to_onnx(tmp_path / "wide.onnx")), wave)
    # the portable graph at opset 18 (older runtimes): GELU in the five-op Erf form, no Gelu op
    old = export_onnx(enc, tmp_path / "wide18.onnx", opset=18, portable=True)
    ops = [n.op_type for n in onnx.load(str(old)).graph.node]
    assert "Erf" in ops and "Gelu" not in ops and ops.count("Gemm") == 7, ops  # patch, qkv, proj, 2 + 2 halves
    _close(enc, OnnxEncoder(old), wave)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(enc, tmp_path / "bad.onnx", opset=17)


def test_linears_export_as_one_gemm_each(exported):
    """Every linear goes to ONNX on 2-D rows (``RowsLinear``), one ``Gemm`` with its bias (onnxruntime fuses
    MatMul + bias into Gemm only on 2-D inputs): the same function as ``nn.Linear`` on [B, L, K] to float32
    rounding, and one Gemm per linear in the exported file (whose frames the tests above compare)."""
    import onnx

    from conftest import F32_ROUNDING

    from bestrq2.onnx import RowsLinear

    torch.manual_seed(4)
    lin = torch.nn.Linear(40, 24)
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        out = RowsLinear(lin)(x)
    assert out.shape == (3, 5, 24)
    assert float((out.double() - exact).abs().max()) <= 4 * F32_ROUNDING * float(exact.abs().max())

    enc, onnx_enc = exported
    graph = onnx.load(str(onnx_enc.path)).graph
    ops = [n.op_type for n in graph.node]
    depth = len(enc.encoder.blocks)
    if any(n.domain == "com.microsoft" for n in graph.node):  # the default: qkv inside onnxruntime's Attention
        assert ops.count("Gemm") == 1 + 3 * depth, ops.count("Gemm")  # patch embedding, then proj, fc1, fc2
        assert {n.op_type for n in graph.node if n.domain == "com.microsoft"} == {"Attention"}
    else:  # portable: standard ops only
        assert ops.count("Gemm") == 1 + 4 * depth, ops.count("Gemm")  # patch embedding, then qkv, proj, fc1, fc2
        assert all(n.domain in ("", "ai.onnx") for n in graph.node)


@pytest.mark.parametrize("mlp_ratio", [4.0, 12.0])
def test_exported_context_encoder_is_the_same_function(mlp_ratio):
    """``ExportedContextEncoder`` outside an export (the attention in standard ops) against ``ContextEncoder`` in
    float64: its float32 error at most twice the encoder's own plus one rounding, on an odd patch count; the
    wide MLP (hidden >= SPLIT_K_FROM) as two halves."""
    from conftest import F32_ROUNDING, float64_twin

    from bestrq2.onnx import ExportedContextEncoder
    from bestrq2.positions import sincos_2d

    torch.manual_seed(5)
    enc = _perturbed(BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=3, mlp_ratio=mlp_ratio)).eval())
    fused = ExportedContextEncoder(enc.encoder)
    raw, n = torch.randn(3, 40, 256), torch.arange(40)
    pos = sincos_2d(n // 5, n % 5, enc.config.encoder_dim)
    with torch.no_grad():
        ref = enc.encoder(raw, pos).double()
        exact = float64_twin(enc.encoder)(raw.double(), pos.double())
        out = fused(raw, pos).double()
    scale = float(exact.abs().max())
    e_ref, e_out = float((ref - exact).abs().max()) / scale, float((out - exact).abs().max()) / scale
    assert e_out <= 2 * e_ref + F32_ROUNDING, (e_out, e_ref)


def test_exported_graph_ops(exported):
    """The default export: per block one onnxruntime Attention and no Softmax; both: a LayerNormalization per
    norm (not onnxruntime's SkipLayerNormalization, 2.8x slower on a CPU), one opset-20 Gelu per MLP (not the
    five-op Erf form), no Split copy."""
    import onnx

    enc, onnx_enc = exported
    graph = onnx.load(str(onnx_enc.path)).graph
    ops = [n.op_type for n in graph.node]
    depth = len(enc.encoder.blocks)
    assert ops.count("LayerNormalization") == 2 * depth + 1 and ops.count("Gelu") == depth, ops
    assert "Erf" not in ops and "Split" not in ops and "SkipLayerNormalization" not in ops, ops
    if any(n.domain == "com.microsoft" for n in graph.node):
        assert ops.count("Attention") == depth and "Softmax" not in ops, ops
    else:
        assert ops.count("Softmax") == depth, ops


def test_ort_export_bench_runs(exported, capsys):
    """``python -m bench.ort_export`` (the exports under onnxruntime against PyTorch's fast fp32 encoder, #19) on
    the fixture's file at a toy size: one paired ratio per batch, positive."""
    from bench.ort_export import main as bench_main

    _, onnx_enc = exported
    assert bench_main(["--preset", "tiny", "--batch", "1", "2", "--rounds", "2", "--files", str(onnx_enc.path)]) == 0
    out = capsys.readouterr().out
    ratios = [float(ln.split()[-1].rstrip("x")) for ln in out.splitlines() if "pytorch / this" in ln]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), out

