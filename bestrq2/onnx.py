"""ONNX export of the encoder (dynamic batch and length) and a runner for onnxruntime.

The exported graph maps a waveform batch [B, T] (float32, 16 kHz, one clip of at most 10 s per row,
T >= MIN_SAMPLES = 9375) to frames [B, W, D] with W = floor((1 + T // 625) / 16): the encoder's ``_frames`` on
equal-length clips. The STFT is written as a two-stage DFT in matmuls (``FactoredLogMel``; ONNX's STFT
op has no complex output that every runtime takes, and onnxruntime's ran 4x slower than the strided
convolution with the DFT basis used before, which this one halves), so the spectrogram differs from
``torch.stft``'s FFT by float32 rounding only. The blocks (``ExportedContextEncoder``) are written for
onnxruntime's CPU provider: each attention as its ``Attention`` contrib op by default, or with
``portable=True`` in standard ONNX ops that any runtime runs. ``OnnxEncoder`` runs the file with onnxruntime and
does what the graph leaves to the caller, as ``BestRQ2Encoder`` does: clips longer than 10 s cut into
10 s chunks (a tail under 1 s zero-padded to 1 s, one frame), padded batches by ``lengths``.
Needs the ``onnx`` extra: ``pip install 'bestrq2[onnx]'`` (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HOP, MIN_SAMPLES, N_FFT, PATCH, REFERENCE_TIME_PATCHES, SAMPLE_RATE
from .context_encoder import ContextEncoder
from .frontend import AMIN, patchify, truncate_to_patches
from .positions import sincos_2d


N1, N2 = 32, 64  # the 2048-point DFT as 32 x 64: sample n = N2 * n1 + n2, bin k = k1 + N1 * k2
K2 = (N_FFT // 2) // N1 + 1  # 33 values of k2 reach bin 1024 (the bins past it are dropped)


class FactoredLogMel(nn.Module):
    """The log-mel frontend with the STFT as a two-stage (32 x 64, Cooley-Tukey) DFT written in matmuls:
    [B, T] -> [B, 128, frames], about 0.3 GFLOP per 10 s clip where the direct DFT basis took 2.2.

    Frames are cut with slices (no gather) and turned to [B, 64 n2, F, 32 n1] (one transpose). Stage 1 is,
    for each n2, one matmul over n1 whose matrix also holds the window and the twiddles W_2048^(n2 k1) (they
    depend on n2 and k1 only), giving the real and imaginary parts of all 32 k1. Stage 2 is one matmul by a
    [66, 128] matrix over (re | im, n2), giving re and im of the 33 k2 that reach bin 1024 as two contiguous
    halves; the power is their sum of squares and the mel matrix is reordered to (k2, k1). Under onnxruntime
    (CPU, one thread, batch 8 of 10 s) this ran the frontend 1.34x faster than the form it replaced (two
    matmuls per stage, the window and the twiddles as elementwise passes), and its float32 error against a
    float64 STFT came out a little lower (official batch clip: 0.052 against 0.053 dB at most)."""

    def __init__(self, window: torch.Tensor, fb: torch.Tensor) -> None:
        super().__init__()
        f64 = torch.float64
        n1, k1, n2, k2 = (torch.arange(v, dtype=f64) for v in (N1, N1, N2, K2))
        w = (window.double() / window.double().pow(2).sum().sqrt()).reshape(N1, N2)  # torchaudio's normalized=True
        # stage 1, for each n2: Y[k1] = sum_n1 x[n1, n2] w[n1, n2] exp(-2 pi i (n1 k1 / 32 + n2 k1 / 2048))
        a1 = 2 * math.pi * (n1[None, :, None] * k1[None, None, :] / N1 + n2[:, None, None] * k1[None, None, :] / N_FFT)
        wt = w.t()[:, :, None]  # [64 n2, 32 n1, 1]
        stage1 = torch.stack([wt * torch.cos(a1), -wt * torch.sin(a1)])  # [re | im, 64 n2, 32 n1, 32 k1]
        # stage 2: X[k2] = sum_n2 (Y_re + i Y_im)(c + i s) = (c Y_re - s Y_im) + i (s Y_re + c Y_im)
        a2 = 2 * math.pi * k2[:, None] * n2[None, :] / N2  # [33 k2, 64 n2]
        c, s = torch.cos(a2), -torch.sin(a2)
        stage2 = torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)])  # [66 (re | im, k2), 128 (re | im, n2)]
        k = (k1[None, :] + N1 * k2[:, None]).long().reshape(-1)  # the bin of (k2, k1), flat k2 * 32 + k1
        keep = k <= N_FFT // 2
        fb_k = torch.zeros(K2 * N1, fb.shape[1], dtype=f64)
        fb_k[keep] = fb.double()[k[keep]]
        for name, t in {"stage1": stage1, "stage2": stage2, "fb_k": fb_k}.items():
            self.register_buffer(name, t.float())

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        b = wave.shape[0]
        x = F.pad(wave[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")[:, 0]
        n = 1 + wave.shape[-1] // HOP
        # frame f = x[625 f : 625 f + 2048] = rows f, f+1, f+2 of x cut into 625-sample rows and the first
        # 173 samples of row f+3 (the 625 zeros make that row exist for the last frame; they are never read)
        x = F.pad(x, (0, HOP))
        rows = x[:, : (x.shape[-1] // HOP) * HOP].reshape(b, -1, HOP)
        full, rest = divmod(N_FFT, HOP)
        frames = torch.cat([rows[:, i: i + n] for i in range(full)] + [rows[:, full: full + n, :rest]], dim=-1)
        frames = frames.reshape(b, n, N1, N2).permute(0, 3, 1, 2)  # [B, 64 n2, F, 32 n1]
        y = frames[:, None] @ self.stage1  # [B, re | im, 64 n2, F, 32 k1]
        z = self.stage2 @ y.reshape(b, 2 * N2, n * N1)  # [B, 66 (re | im, k2), F * 32 k1]
        power = z.reshape(b, 2, K2 * n * N1).pow(2).sum(1).reshape(b, K2, n, N1)  # [B, 33 k2, F, 32 k1]
        mel = power.transpose(1, 2).reshape(b, n, K2 * N1) @ self.fb_k  # [B, F, 128]
        return (10.0 * torch.log10(torch.clamp(mel, min=AMIN))).transpose(1, 2)


class RowsLinear(nn.Module):
    """``linear`` on the rows of its input flattened to 2-D ([..., K] -> [rows, K] -> [..., N]): the same
    function, exported as one ONNX ``Gemm`` with its bias (onnxruntime fuses MatMul + Add into Gemm only for
    2-D inputs; on [B, L, K] the bias add was a pass of its own). The ViT-B encoder ran 7% faster at batch 8
    under onnxruntime (2-core Xeon, whole processes, 6 pairs) and no slower at batch 1. ``rows`` / ``cols``: a
    slice of the weight's output / input features (and ``bias=False`` to leave the bias out), for a linear
    split in parts."""

    def __init__(self, linear: nn.Linear, rows: slice = slice(None), cols: slice = slice(None),
                 bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach()[rows, cols].clone())
        self.bias = None if linear.bias is None or not bias else nn.Parameter(linear.bias.detach()[rows].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


SPLIT_K_FROM = 2048  # MLPs with at least this many hidden features go to ONNX in two halves
MS = "com.microsoft::"  # onnxruntime's contrib ops (built into its standard packages, CPU provider included)


def _attention(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, heads: int, fused: bool) -> torch.Tensor:
    """Multi-head self-attention of x [B, L, D] with its q, k, v projection (w [3 D, D], b [3 D], rows
    q | k | v, heads within each) -> [B, L, D], before the output projection. ``fused`` and under an ONNX
    export: one onnxruntime ``Attention`` (contrib op; the projection, every head's softmax(q k^T / sqrt(Dh)) v
    and their merge), which ran 9% faster than the standard ops' form (Gemm, Reshape, Transpose, Split, three
    Squeezes, a Transpose, MatMul, Softmax, MatMul, Transpose) on [8, 128, 768], one thread of a 2-core Xeon.
    Else the standard form, written out as matmul + softmax (which every ONNX runtime has)."""
    d = x.shape[-1]
    if fused and torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(MS + "Attention", (x, w.t(), b), {"num_heads": heads}, dtype=x.dtype,
                                       shape=x.shape, version=1)
    q, k, v = F.linear(x.reshape(-1, d), w, b).reshape(*x.shape[:-1], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax((q @ k.transpose(-1, -2)) * (d // heads) ** -0.5, dim=-1)
    return (att @ v).transpose(1, 2).flatten(-2)


class ExportedContextEncoder(nn.Module):
    """``ContextEncoder`` as it goes into the ONNX file: ``(raw [B, L, 256], pos [L, D]) -> [B, L, D]``, the
    same function around copies of the same weights, written for onnxruntime's CPU provider:
    - every linear on 2-D rows (``RowsLinear``): one Gemm with its bias (on [B, L, K] the bias add was a
      pass of its own);
    - the residual adds and LayerNorms as standard Add + LayerNormalization: onnxruntime's fused
      ``SkipLayerNormalization`` ran them 2.8x slower on [1024, 768] (6.1 vs 2.2 ms, one thread);
    - exact GELU as one ``Gelu`` (ONNX opset 20; at opset 18 it is Div, Erf, Add, Mul, Mul: twice the time);
    - wide MLPs (hidden >= ``SPLIT_K_FROM``) in two halves: fc1's output features and fc2's input features
      split, so fc2 is two half-K Gemms (onnxruntime's GEMM ran K = 3,072 a third slower than two halves)
      with no Split copy between; the first half's Gemm takes fc2's bias;
    - ``fused_attention``: each block's attention as onnxruntime's ``Attention`` contrib op (only onnxruntime
      runs the file then), else in standard ops."""

    def __init__(self, encoder: ContextEncoder, fused_attention: bool = True) -> None:
        super().__init__()
        self.fused_attention = fused_attention
        self.heads = encoder.blocks[0].attn.heads
        self.patch_embed = RowsLinear(encoder.patch_embed)
        blocks = encoder.blocks
        self.norm1 = nn.ModuleList(_copy_norm(b.norm1) for b in blocks)
        self.norm2 = nn.ModuleList(_copy_norm(b.norm2) for b in blocks)
        self.norm = _copy_norm(encoder.norm)
        self.qkv_w = nn.ParameterList(_copy(b.attn.qkv.weight) for b in blocks)
        self.qkv_b = nn.ParameterList(_copy(b.attn.qkv.bias) for b in blocks)
        self.proj = nn.ModuleList(RowsLinear(b.attn.proj) for b in blocks)
        hidden = blocks[0].mlp.fc1.out_features
        self.mlp_parts = 2 if hidden >= SPLIT_K_FROM else 1
        cuts = [hidden * i // self.mlp_parts for i in range(self.mlp_parts + 1)]
        self.fc1, self.fc2 = nn.ModuleList(), nn.ModuleList()
        for b in blocks:
            for j, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
                self.fc1.append(RowsLinear(b.mlp.fc1, rows=slice(lo, hi)))
                self.fc2.append(RowsLinear(b.mlp.fc2, cols=slice(lo, hi), bias=j == 0))

    def forward(self, raw: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(raw) + pos
        y = _layer_norm(self.norm1[0], x)
        depth, parts = len(self.norm1), self.mlp_parts
        for i in range(depth):
            a = _attention(y, self.qkv_w[i], self.qkv_b[i], self.heads, self.fused_attention)
            x = x + self.proj[i](a)
            y = _layer_norm(self.norm2[i], x)
            m = None
            for j in range(i * parts, (i + 1) * parts):
                part = self.fc2[j](F.gelu(self.fc1[j](y)))
                m = part if m is None else m + part
            x = x + m
            y = _layer_norm(self.norm if i + 1 == depth else self.norm1[i + 1], x)
        return y


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _copy(p: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().clone())


def _copy_norm(norm: nn.LayerNorm) -> nn.LayerNorm:
    out = nn.LayerNorm(norm.normalized_shape, eps=norm.eps)
    out.load_state_dict(norm.state_dict())
    return out


class _ExportedFrames(nn.Module):
    """wave [B, T] -> frames [B, W, D], the graph that goes into the ONNX file: the two-stage DFT frontend,
    the positions and ``ExportedContextEncoder`` (``fused_attention``: onnxruntime's Attention op)."""

    def __init__(self, enc, fused_attention: bool = True) -> None:
        super().__init__()
        self.frontend = FactoredLogMel(enc.frontend.window, enc.frontend.fb)
        self.encoder = ExportedContextEncoder(enc.encoder, fused_attention)
        self.dim, self.layout = enc.config.encoder_dim, enc.config.pos_layout
        self.fp = enc.config.freq_patches

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = truncate_to_patches(self.frontend(wave))
        w = spec.shape[-1] // PATCH
        if self.layout == "grid":  # cell (f, t) of the 8 x W grid, built without dividing by the symbolic W
            f = torch.arange(self.fp, device=wave.device)[:, None].expand(self.fp, w).reshape(-1)
            t = torch.arange(w, device=wave.device)[None, :].expand(self.fp, w).reshape(-1)
        else:  # the authors' rows: flat index into their 8 x 16 table
            n = torch.arange(self.fp * w, device=wave.device)
            f, t = n // REFERENCE_TIME_PATCHES, n % REFERENCE_TIME_PATCHES
        tok = self.encoder(patchify(spec), sincos_2d(f, t, self.dim))
        return tok.reshape(tok.shape[0], self.fp, w, -1).mean(dim=1)


def export_onnx(enc, path: str | Path, opset: int = 20, portable: bool = False) -> Path:
    """Write ``enc`` (a ``BestRQ2Encoder``) as ONNX with dynamic batch and length. Returns the path.
    ``portable=False`` (default): the attention as onnxruntime's ``Attention`` contrib op, which only onnxruntime
    runs; ``portable=True``: standard ONNX ops only (Gemm, MatMul, Softmax, LayerNormalization, Gelu, ...), for
    any runtime. ``opset`` 20 has the ``Gelu`` op; at 18 (older runtimes) GELU is written with ``Erf``."""
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (the exporter's LayerNormalization and Split forms), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _ExportedFrames(enc, fused_attention=not portable).eval()
    wave = torch.randn(2, 3 * SAMPLE_RATE) * 0.1
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("samples", min=MIN_SAMPLES, max=10 * SAMPLE_RATE)
    with torch.no_grad():
        torch.onnx.export(model, (wave,), str(path), input_names=["wave"], output_names=["frames"],
                          dynamic_shapes={"wave": {0: batch, 1: length}}, opset_version=opset, dynamo=True,
                          external_data=False)
    return path


class OnnxEncoder:
    """The exported encoder under onnxruntime, with ``BestRQ2Encoder``'s contract: ``enc(wave, lengths=None)``
    on float [B, T] 16 kHz audio of any length -> frames [B, T', D] (numpy float32). Pieces that feed the
    same number of samples (equal-length clips, the 10 s chunks of long clips) run as one batch of at most
    ``max_batch`` rows; a clip's frames do not depend on what it is batched with, up to float32 rounding.

    ``threads``: CPU threads (default: PyTorch's ``torch.get_num_threads()``), onnxruntime's intra-op threads.
    ``split_batches=True``: a run of several rows is instead cut into up to ``threads`` sub-batches run at the
    same time, one thread each, on a single-threaded second session (loaded on the first such run: the
    weights held twice), so that each core runs whole GEMMs with no hand-over between threads. On a 2-core
    Xeon, ViT-B at batch 8, that was 1.01x (six process pairs) to 1.02-1.05x (paired rounds in one process)
    the one-run time: within this host's noise, hence off by default."""

    sampling_rate = SAMPLE_RATE
    hop_size_in_ms = PATCH * HOP * 1000 / SAMPLE_RATE

    def __init__(self, path: str | Path, threads: int | None = None, max_batch: int = 16,
                 split_batches: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.max_batch = max_batch
        self.path = Path(path)
        threads = threads or torch.get_num_threads()
        self.workers = threads if split_batches else 1
        self._serial = self._pool = None
        self.session = self._session(threads)

    def num_output_frames(self, num_samples: int) -> int:
        """Frames a clip of ``num_samples`` samples gets (as ``BestRQ2Encoder.num_output_frames``)."""
        from .encoder import frames_of

        return frames_of(num_samples)

    def _session(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def _run(self, wave: np.ndarray) -> np.ndarray:
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        parts = min(self.workers, wave.shape[0])
        if parts < 2:
            return self.session.run(["frames"], {"wave": wave})[0]
        if self._serial is None:
            from concurrent.futures import ThreadPoolExecutor

            # onnxruntime's run() is thread-safe and releases the GIL: one single-threaded session serves
            # every sub-batch at once (concurrent runs on the multi-threaded one fought over its threads)
            self._serial, self._pool = self._session(1), ThreadPoolExecutor(self.workers)
        runs = [self._pool.submit(self._serial.run, ["frames"], {"wave": part})
                for part in np.array_split(wave, parts)]
        return np.concatenate([r.result()[0] for r in runs])

    def __call__(self, wave, lengths=None) -> np.ndarray:
        from .encoder import chunk_plan, join_clips
        from .inputs import check_wave

        wave, lengths = check_wave(torch.as_tensor(wave), lengths, None)
        wave = wave.float().numpy()
        lens = lengths.tolist() if lengths is not None else [wave.shape[1]] * wave.shape[0]
        # every clip's pieces, grouped by the samples fed: one session run per group (at most
        # max_batch rows), so a batch of equal-length clips is one batched run, as in PyTorch
        plans = [chunk_plan(n) for n in lens]
        groups: dict[int, list[tuple[int, int]]] = {}
        for i, plan in enumerate(plans):
            for j, (_, _, fed, _) in enumerate(plan):
                groups.setdefault(fed, []).append((i, j))
        pieces: dict[tuple[int, int], np.ndarray] = {}
        for fed, members in groups.items():
            for k in range(0, len(members), self.max_batch):
                rows = members[k: k + self.max_batch]
                batch = np.zeros((len(rows), fed), dtype=np.float32)
                for row, (i, j) in enumerate(rows):
                    start, r, _, _ = plans[i][j]
                    batch[row, :r] = wave[i, start: start + r]
                out = self._run(batch)
                for row, (i, j) in enumerate(rows):
                    pieces[i, j] = out[row, : plans[i][j][3]]
        return join_clips([[torch.from_numpy(pieces[i, j]) for j in range(len(plan))]
                           for i, plan in enumerate(plans)]).numpy()
