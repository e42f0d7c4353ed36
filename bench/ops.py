"""Kernel microbenchmarks: each op in bestrq2.kernels and the attention backends, fast path vs its
reference vs torch.compile of the reference, forward / backward / full, at the paper's shapes and a
size sweep. Byte and FLOP counts are stated per op below; %-of-bound uses the bounds measured in
the same run (bench.common.measure_bounds).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from bestrq2 import attention as A
from bestrq2.kernels import (add_layer_norm, add_layer_norm_ref, bias_gelu, bias_gelu_ref, choose_chunk, gather_tokens, gather_tokens_ref, layer_norm,
                             layer_norm_ref, linear_cross_entropy, residual_drop_path, residual_drop_path_ref, rpq_codes,
                             rpq_codes_ref, scatter_tokens, scatter_tokens_ref)

from .common import CudaPeak, Recorder, time_fn, time_graph, with_env


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _run_modes(rec, op, provider, shape, device, fwd, inputs, bytes_, flops, bounds, modes, reps):
    """Time forward, backward (grad of a fixed upstream grad) and full for one provider."""
    results = {}
    for mode in modes:
        if mode == "forward":
            fn = fwd
        else:
            out = fwd()  # a tensor, or a tuple of them (each gets its own upstream grad)
            g = tuple(map(torch.randn_like, out)) if isinstance(out, tuple) else torch.randn_like(out)
            if mode == "backward":
                def fn(out=out, g=g):
                    return torch.autograd.grad(out, inputs, g, retain_graph=True)
            else:
                def fn(g=g):
                    return torch.autograd.grad(fwd(), inputs, g)
        peak = None
        if device.type == "cuda":
            with CudaPeak(device) as p:
                fn()
            peak = p.peak
        med, p20, p80 = time_fn(fn, device, reps=reps)
        results[mode] = med
        rec.add(op, provider, mode, shape, "time_ms", med)
        rec.add(op, provider, mode, shape, "time_p20_ms", p20)
        rec.add(op, provider, mode, shape, "time_p80_ms", p80)
        if device.type == "cuda" and med < 1.0:  # below 1 ms launches weigh: CUDA-graph replay beside eager
            g_med = time_graph(fn)
            if g_med is not None:
                results[f"{mode}@graph"] = g_med
                rec.add(op, provider, mode, shape, "time_graph_ms", g_med)
        if bytes_ is not None:
            gbps = bytes_[mode] / med / 1e6
            rec.add(op, provider, mode, shape, "gbps", gbps)
            rec.add(op, provider, mode, shape, "pct_of_copy_bound", 100 * gbps / bounds["copy_gbps"])
        if flops is not None:
            tf = flops[mode] / med / 1e9
            rec.add(op, provider, mode, shape, "tflops", tf)
            rec.add(op, provider, mode, shape, "pct_of_matmul_bound", 100 * tf / bounds["matmul_tflops"])
        if peak is not None:
            rec.add(op, provider, mode, shape, "peak_mem_bytes", peak)
    return results


def _ratio_rows(rec, op, shape, times: dict[str, dict[str, float]], fast: str, ref: str = "reference"):
    """speedup_vs_<ref> per mode (eager), and speedup_vs_<ref>_graph where both have graph times."""
    if fast in times and ref in times:
        for key, t in times[fast].items():
            if key in times[ref]:
                mode, graph = key.split("@")[0], "@graph" in key
                rec.add(op, fast, mode, shape, f"speedup_vs_{ref}" + ("_graph" if graph else ""), times[ref][key] / t)


SMOKE = {"on": False}  # smoke runs skip torch.compile providers: compiling is what takes the time


def providers(device: torch.device, with_fast: bool) -> list[str]:
    return (["fast"] if with_fast else []) + ["reference"] + ([] if SMOKE["on"] else ["compile"])


RPQ_ALTERNATIVES = {"fast_k64": "32,64,4", "fast_w8": "32,128,8"}  # BESTRQ2_RPQ_CFG tiles timed beside the default


def bench_rpq(rec: Recorder, device, bounds, smoke: bool, with_fast: bool, reps: int) -> None:
    """Bytes: the m masked patches read once (B m 256 values) + codebook + projection + codes written.
    FLOPs: 2 B m C (256 d + K d) (projection, then scores against every code)."""
    k, d, fr = (1024, 16, 64) if smoke else (8192, 16, 256)
    batches = [2] if smoke else [32, 64, 128, 256]
    dt = torch.float32
    for b in batches:
        spec = torch.randn(b, 128, fr, device=device, dtype=dt) * 20 - 40
        n = 8 * (fr // 16)
        m = n // 2
        idx = torch.stack([torch.randperm(n, device=device)[:m] for _ in range(b)])
        p = torch.randn(1, 256, d, device=device) * 0.09
        cb = F.normalize(torch.randn(1, k, d, device=device), dim=-1)
        shape = f"B={b},N={n},m={m},K={k},d={d},{str(dt)[6:]}"
        nbytes = {"forward": b * m * 256 * spec.element_size() + (k * d + 256 * d) * 4 + b * m * 8}
        flops = {"forward": 2 * b * m * (256 * d + k * d)}
        fns = {"fast": lambda: rpq_codes(spec, p, cb, idx, impl="triton"), "reference": lambda: rpq_codes_ref(spec, p, cb, idx),
               "compile": (lambda f=_compiled(rpq_codes_ref): f(spec, p, cb, idx)),
               # the default (32 rows, 128 codes, 4 warps) issues the fewest instructions per score (374 per
               # 128-code tile, bench.gpu_compile) at 218 registers; these hold 128 (more warps per SM)
               **{name: (lambda cfg=cfg: with_env("BESTRQ2_RPQ_CFG", cfg, rpq_codes, spec, p, cb, idx, impl="triton"))
                  for name, cfg in RPQ_ALTERNATIVES.items()}}
        times = {}
        extra = list(RPQ_ALTERNATIVES) if (with_fast and device.type == "cuda" and not smoke) else []
        for prov in providers(device, with_fast) + extra:
            times[prov] = _run_modes(rec, "rpq_codes", prov, shape, device, fns[prov], (), nbytes, flops, bounds,
                                     ["forward"], reps)
        _ratio_rows(rec, "rpq_codes", shape, times, "fast")
        for name in RPQ_ALTERNATIVES:
            _ratio_rows(rec, "rpq_codes", shape, times, "fast", ref=name)
        _ratio_rows(rec, "rpq_codes", shape, times, "fast", ref="compile")
        _ratio_rows(rec, "rpq_codes", shape, times, "compile")


def bench_gather_scatter(rec: Recorder, device, bounds, smoke: bool, with_fast: bool, reps: int) -> None:
    """The dtypes the model uses: tokens in the compute dtype (bf16 on CUDA), the sincos position table
    in float32 and constant (no grad), the mask token a float32 parameter; outputs promote to float32.
    gather: forward reads B M D tokens + N D table, writes B M D; backward reads B M D, writes B N D.
    scatter: forward reads B M D + N D + D, writes B N D; backward reads B N D, writes B M D (+ D)."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(2, 16, 32, 8)] if smoke else [(256, 128, 768, 64), (64, 128, 768, 64), (256, 256, 768, 128)]
    for b, n, d, m in shapes:
        es, f4 = torch.tensor([], dtype=dt).element_size(), 4
        x = torch.randn(b, n, d, device=device, dtype=dt, requires_grad=True)
        pos = torch.randn(n, d, device=device)  # float32, constant
        perm = torch.stack([torch.randperm(n, device=device) for _ in range(b)])
        ci, fi = perm[:, :m].sort(1).values.contiguous(), perm[:, m:].sort(1).values.contiguous()
        shape = f"B={b},N={n},D={d},M={m},{str(dt)[6:]}+fp32 table"
        gb = {"forward": es * b * m * d + f4 * (n * d + b * m * d), "backward": f4 * b * m * d + es * b * n * d}
        gb["full"] = gb["forward"] + gb["backward"]
        fns = {"fast": lambda: gather_tokens(x, ci, pos, impl="triton"), "reference": lambda: gather_tokens_ref(x, ci, pos),
               "compile": (lambda f=_compiled(gather_tokens_ref): f(x, ci, pos))}
        times = {p: _run_modes(rec, "gather_tokens", p, shape, device, fns[p], (x,), gb, None, bounds,
                               ["forward", "backward", "full"], reps) for p in providers(device, with_fast)}
        _ratio_rows(rec, "gather_tokens", shape, times, "fast")
        _ratio_rows(rec, "gather_tokens", shape, times, "fast", ref="compile")
        ctx = torch.randn(b, m, d, device=device, dtype=dt, requires_grad=True)
        fill = torch.randn(d, device=device, requires_grad=True)  # the mask token: a float32 parameter
        sb = {"forward": es * b * m * d + f4 * (n * d + d + b * n * d), "backward": f4 * (b * n * d + d) + es * b * m * d}
        sb["full"] = sb["forward"] + sb["backward"]
        fns = {"fast": lambda: scatter_tokens(ctx, ci, fill, fi, pos, impl="triton"),
               "reference": lambda: scatter_tokens_ref(ctx, ci, fill, fi, pos),
               "compile": (lambda f=_compiled(scatter_tokens_ref): f(ctx, ci, fill, fi, pos))}
        times = {p: _run_modes(rec, "scatter_tokens", p, shape, device, fns[p], (ctx, fill), sb, None, bounds,
                               ["forward", "backward", "full"], reps) for p in providers(device, with_fast)}
        _ratio_rows(rec, "scatter_tokens", shape, times, "fast")
        _ratio_rows(rec, "scatter_tokens", shape, times, "fast", ref="compile")


def bench_block_ops(rec: Recorder, device, bounds, smoke: bool, with_fast: bool, reps: int) -> None:
    """The transformer block's Triton ops at ViT-B training shapes: 16,384 rows (256 clips x 64 visible
    tokens), D 768, MLP width 3,072, in the dtypes the model gives them under bf16 autocast on CUDA (a float32
    residual stream, bf16 matmul outputs, float32 parameters; float32 throughout on CPU).
    layer_norm: forward reads R D (x, fp32) and writes R D (y) + 2 R stats; backward reads R D (dy) + R D (x)
    and writes R D (dx, fp32). bias_gelu: forward reads and writes R H; backward reads 2 R H, writes R H.
    residual_drop_path: forward reads R D (x, fp32) + R D (branch), writes R D (fp32); backward reads R D,
    writes R D (dx) + R D (dbranch). add_layer_norm (the two fused): forward reads R D (x, fp32) + R D (branch),
    writes R D (s, fp32) + R D (y); backward reads R D (dy) + 2 R D (s, ds: fp32), writes R D (dx, fp32) + R D
    (dbranch). Per-block partial sums of the parameter grads are not counted."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, d, h = (64, 32, 128) if smoke else (16384, 768, 3072)
    es, f4 = torch.tensor([], dtype=dt).element_size(), 4
    modes = ["forward", "backward", "full"]

    def run(op, shape, fns, inputs, nbytes, extra=()):  # extra: providers timed on a GPU only, "fast" vs each
        nbytes["full"] = nbytes["forward"] + nbytes["backward"]
        extra = list(extra) if (with_fast and device.type == "cuda" and not smoke) else []
        times = {p: _run_modes(rec, op, p, shape, device, fns[p], inputs, nbytes, None, bounds, modes, reps)
                 for p in providers(device, with_fast) + extra}
        for ref in ("reference", "compile", *extra):
            _ratio_rows(rec, op, shape, times, "fast", ref=ref)

    x = torch.randn(rows, d, device=device, requires_grad=True)  # the float32 residual stream
    w = torch.ones(d, device=device, requires_grad=True)
    b = torch.zeros(d, device=device, requires_grad=True)
    run("layer_norm", f"R={rows},D={d},fp32->{str(dt)[6:]}",
        {"fast": lambda: layer_norm(x, w, b, out_dtype=dt, impl="triton"),
         "reference": lambda: layer_norm_ref(x, w, b, out_dtype=dt),
         "compile": (lambda f=_compiled(layer_norm_ref): f(x, w, b, 1e-5, dt))},
        (x, w, b), {"forward": f4 * rows * d + es * rows * d + 8 * rows, "backward": es * rows * d + 2 * f4 * rows * d})
    xh = torch.randn(rows, h, device=device, dtype=dt, requires_grad=True)  # fc1's output without its bias
    bias = torch.zeros(h, device=device, requires_grad=True)
    run("bias_gelu", f"R={rows},H={h},{str(dt)[6:]}+fp32 bias",
        {"fast": lambda: bias_gelu(xh, bias, impl="triton"), "reference": lambda: bias_gelu_ref(xh, bias),
         "compile": (lambda f=_compiled(bias_gelu_ref): f(xh, bias))},
        (xh, bias), {"forward": 2 * es * rows * h, "backward": 3 * es * rows * h})
    branch = torch.randn(rows, d, device=device, dtype=dt, requires_grad=True)
    keep = (torch.rand(rows, device=device) > 0.1).float() / 0.9  # drop-path 0.1: a per-row scale
    run("residual_drop_path", f"R={rows},D={d},fp32+{str(dt)[6:]}",
        {"fast": lambda: residual_drop_path(x, branch, keep, impl="triton"),
         "reference": lambda: residual_drop_path_ref(x, branch, keep),
         "compile": (lambda f=_compiled(residual_drop_path_ref): f(x, branch, keep))},
        (x, branch), {"forward": 2 * f4 * rows * d + es * rows * d, "backward": 2 * f4 * rows * d + es * rows * d})
    # the residual add fused with the LayerNorm after it, (s, y), both outputs with an upstream grad (the
    # residual stream's and the branch's); fast_unfused: the two Triton ops above, one after the other
    unfused = lambda: (lambda s: (s, layer_norm(s, w, b, out_dtype=dt, impl="triton")))(  # noqa: E731
        residual_drop_path(x, branch, keep, impl="triton"))
    run("add_layer_norm", f"R={rows},D={d},fp32+{str(dt)[6:]}->{str(dt)[6:]}",
        {"fast": lambda: add_layer_norm(x, branch, keep, w, b, out_dtype=dt, impl="triton"),
         "reference": lambda: add_layer_norm_ref(x, branch, keep, w, b, out_dtype=dt),
         "compile": (lambda f=_compiled(add_layer_norm_ref): f(x, branch, keep, w, b, 1e-5, dt)),
         "fast_unfused": unfused},
        (x, branch, w, b), {"forward": 2 * f4 * rows * d + 2 * es * rows * d + 12 * rows,
                            "backward": 3 * f4 * rows * d + 2 * es * rows * d + 12 * rows}, extra=["fast_unfused"])


def bench_frontend(rec: Recorder, device, bounds, smoke: bool, with_fast: bool, reps: int) -> None:
    """The log-mel power (``LogMel.power_mel``: squares into the mel matmul, the normalisation on the 128
    mel bins) against the authors' order (``_power_mel_reference``: the complex STFT divided, abs, squared,
    matmul) and torch.compile of it, forward only (no grads: the frontend feeds targets and inputs), 10 s
    clips: 256 on CUDA (a training batch), 8 on CPU. No GB/s: the traffic is the STFT's intermediates
    (``python -m bench.step_inventory`` counts them), not the waveform in and the mel out."""
    from bestrq2.frontend import LogMel

    clips, seconds = (2, 1) if smoke else ((256, 10) if device.type == "cuda" else (8, 10))
    lm = LogMel().to(device)
    wave = torch.randn(clips, 16_000 * seconds, device=device) * 0.1
    fns = {"fast": lambda: lm.power_mel(wave), "reference": lambda: lm._power_mel_reference(wave)}
    if not SMOKE["on"]:
        fns["compile"] = (lambda f=_compiled(lm._power_mel_reference): f(wave))
    shape = f"B={clips},{seconds}s,fp32"
    with torch.no_grad():
        times = {p: _run_modes(rec, "logmel_power", p, shape, device, fn, (), None, None, bounds, ["forward"], reps)
                 for p, fn in fns.items()}
    for ref in ("reference", "compile"):
        _ratio_rows(rec, "logmel_power", shape, times, "fast", ref=ref)


def chunked_compiled_ce(chunk: int):
    """The compiled baseline: the same chunked computation and the same work as the fused op (loss,
    grads and the top-1 hits it reports), each chunk by a torch.compile'd function (no custom kernel)."""

    @torch.compile(dynamic=False)
    def step(hc, w, b, tc, scale):
        logits = (hc @ w.T + b).float()
        lse = torch.logsumexp(logits, 1)
        loss = (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
        hits = (logits.argmax(1) == tc).sum()
        g = torch.softmax(logits, 1)
        g = g - F.one_hot(tc, logits.shape[1]).float()
        g = (g * scale).to(hc.dtype)
        return loss + 0 * hits, g @ w, g.T @ hc, g.float().sum(0)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, b, t):
            scale = 1.0 / h.shape[0]
            gh = torch.empty_like(h)
            gw = torch.zeros(w.shape, dtype=torch.float32, device=h.device)
            gbias = torch.zeros(b.shape, dtype=torch.float32, device=h.device)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for r0 in range(0, h.shape[0], chunk):
                l, a, bw, bb = step(h[r0: r0 + chunk], w, b, t[r0: r0 + chunk], scale)
                loss += l
                gh[r0: r0 + chunk] = a
                gw += bw
                gbias += bb
            ctx.save_for_backward(gh, gw, gbias)
            return loss * scale

        @staticmethod
        def backward(ctx, go):
            gh, gw, gbias = ctx.saved_tensors
            return gh * go, (gw * go).to(gh.dtype), (gbias * go).to(gh.dtype), None

    return Fn.apply


def bench_head(rec: Recorder, device, bounds, smoke: bool, with_fast: bool, reps: int) -> None:
    """FLOPs: 6 M K D (logits, grad_h, grad_W). Peak memory: CUDA max_memory_allocated above the inputs
    (CPU: see bench.__main__'s subprocess probe)."""
    if device.type == "cuda":
        m, d, k, dt = (256, 64, 1024, torch.bfloat16) if smoke else (16384, 768, 8192, torch.bfloat16)
    else:
        m, d, k, dt = (128, 64, 1024, torch.float32) if smoke else (2048, 768, 8192, torch.float32)
    h = (torch.randn(m, d, device=device) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(1, k, d, device=device) * 0.02).to(dt).requires_grad_()
    b = torch.zeros(1, k, device=device, dtype=dt, requires_grad=True)
    t = torch.randint(0, k, (m, 1), device=device)
    shape = f"M={m},D={d},K={k},C=1,{str(dt)[6:]}"
    flops = {"full": 6 * m * k * d}
    fused_impl = "triton" if (with_fast or device.type == "cuda") else "torch"
    comp = chunked_compiled_ce(choose_chunk(m, k, h.element_size()))  # the fused op's own chunk rule
    fns = {"fused": lambda: linear_cross_entropy(h, w, b, t, impl=fused_impl)[0],
           "reference": lambda: linear_cross_entropy(h, w, b, t, impl="reference")[0]}
    if not SMOKE["on"]:
        fns["compile_chunked"] = lambda: comp(h, w[0], b[0], t[:, 0])
    times = {p: _run_modes(rec, "linear_cross_entropy", p, shape, device, fns[p], (h, w, b), None, flops, bounds,
                           ["full"], reps) for p in fns}
    _ratio_rows(rec, "linear_cross_entropy", shape, times, "fused")
    _ratio_rows(rec, "linear_cross_entropy", shape, times, "fused", ref="compile_chunked")


def bench_attention(rec: Recorder, device, bounds, smoke: bool, with_fast: bool, reps: int) -> None:
    """FLOPs: forward 4 B H N^2 Dh; backward 2.5x forward (FlashAttention's convention)."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = 256 if smoke else (32768 if device.type == "cuda" else 2048)
    lengths = [16] if smoke else [64, 128, 256]
    avail = A.available()
    names = ["sdpa", "math"] + (["triton"] if with_fast else []) + \
            [n for n in ("flash_attn", "fa4") if avail[n] and device.type == "cuda"]
    for n in lengths:
        b, h, dh = max(1, tokens // n), 12 if not smoke else 2, 64
        q, k, v = (torch.randn(b, n, h, dh, device=device, dtype=dt, requires_grad=True) for _ in range(3))
        shape = f"B={b},N={n},H={h},Dh={dh},{str(dt)[6:]}"
        f_fwd = 4 * b * h * n * n * dh
        flops = {"forward": f_fwd, "backward": 2.5 * f_fwd, "full": 3.5 * f_fwd}
        times = {}
        for name in names:
            times[name] = _run_modes(rec, "attention", name, shape, device,
                                     lambda name=name: A.dense_attention(q, k, v, name), (q, k, v), None, flops,
                                     bounds, ["forward", "backward", "full"], reps)
        for name in names:
            if name != "math":
                _ratio_rows(rec, "attention", shape, times, name, ref="math")
