"""python -m bench.gpu_compile: compile every Triton kernel launch of the GPU paths for real GPU targets,
on a machine without a GPU. Device time is scarce (a lent GPU gives a session about 15 minutes); a kernel
that fails to compile, or asks for more shared memory than the card has, should not be found there.

How: with ``TRITON_INTERPRET`` unset, the launchers pick the configs they pick on a GPU (block sizes,
warps, stages, tensor-core dots, no interpreter workarounds). ``JITFunction.run`` is replaced by a recorder,
so every launch is captured (kernel, argument types, constexprs, launch options) instead of run; the ops
are called with CPU tensors as stand-ins, their outputs left unwritten. Scenarios: a forward and backward of
a one-block ViT-B model (every kernel on Triton, bf16 autocast as in GPU training, and float32), the
attention at 64, 128 and 256 tokens (``--sweep``: also in every tuning config of ``bench.gpu_probe``), the
gather / scatter with float32 position tables, the RPQ from the log-mel and from patch rows, with and
without splits, the head at K 8,192, the drop-path residual. Each distinct
launch is then compiled for each target through the JIT's own path (``JITFunction.run(warmup=True)`` with a
stand-in driver that only names the target: the arguments are specialised as on the card; ptxas, bundled
with triton, makes the cubin) and its shared memory compared with the target's per-block limit; registers per thread and spills (stack
bytes) are reported from ``cuobjdump`` (spills are reported, not failed: they cost speed, not correctness),
and from its SASS the instruction mix (``instruction_mix``): tensor-core instructions by kind, and each
loop's body length, tensor-core instructions and barriers: a static cost per iteration to compare
kernel variants by before any device time is spent (``--sass DIR`` keeps the SASS).

``--trace-step``: instead, the Triton path's training step through ``torch.compile(fullgraph=True)`` (AOTAutograd,
kernels recorded), listing what its functional graphs copy before a kernel writes it (``trace_step``).

Not checked: runtime faults, numerics and speed (those need the card). Exit status 1 on any failure. ``--arch 90 80``: targets (sm_90: H100/H200, sm_80: A100).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448}  # bytes per block (opt-in max)


def record_launches() -> list[tuple]:
    """From here on, in this process: every Triton launch is appended to the returned list as (kernel,
    args, kwargs) instead of run (its outputs stay unwritten), and the ops take their Triton path for CPU
    tensors with the interpreter off, so the launchers pick the configs a GPU gets. For tools that look at
    a step without running it (this one, ``bench.step_inventory``)."""
    import torch
    from triton.runtime.jit import JITFunction

    launches: list[tuple] = []

    def record(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 (grid: runtime only)
        launches.append((self, args, kwargs))

    global _JIT_RUN
    _JIT_RUN = JITFunction.run
    JITFunction.run = record
    import bestrq2  # noqa: F401 (every module that holds use_triton, loaded before it is replaced)
    from bestrq2.kernels import _dispatch

    def use_triton(*tensors, impl=None):  # the Triton path for every non-float64 input, CPU stand-ins included
        return _dispatch.backend(impl) != "reference" and not any(t.dtype == torch.float64 for t in tensors)

    original = _dispatch.use_triton
    for m in [sys.modules[n] for n in list(sys.modules) if n.startswith("bestrq2.")]:
        if getattr(m, "use_triton", None) is original:
            m.use_triton = use_triton
    import bestrq2.attention

    bestrq2.attention.interpreting = lambda: True  # lets the forced "triton" backend take CPU stand-ins
    os.environ["BESTRQ2_CHECK"] = "0"  # the stand-in outputs are never written: no data checks on them
    return launches


def _capture(sweep: list[str], only: list[str]) -> list[tuple]:
    """Run the scenarios with launches recorded instead of run: [(kernel, args, kwargs)]."""
    import torch

    import bestrq2.kernels as K

    launches = record_launches()
    for name, fn in _scenarios(torch, K, sweep).items():
        if only and not any(o in name for o in only):
            continue
        before = len(launches)
        try:
            fn()
        except Exception:  # a scenario that cannot even launch is a failure of its own
            traceback.print_exc()
            launches.append((None, name, None))
            continue
        print(f"  {name}: {len(launches) - before} launches")
    return launches


def _scenarios(torch, K, sweep: list[str]) -> dict:
    from functools import partial

    from bench.common import with_env

    from bestrq2 import BestRQ2, BestRQ2Config
    from bestrq2.config import OPS
    from bestrq2.kernels.attention import triton_attention, triton_qkv_attention

    def model_step(dtype):
        def run():
            torch.manual_seed(0)
            cfg = BestRQ2Config.preset("base", encoder_depth=1, predictor_depth=1,
                                       kernels={op: "triton" for op in OPS})
            model = BestRQ2(cfg)
            wave = torch.randn(2, 160_000) * 0.1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(wave)
            out.loss.float().sum().backward()
        return run

    def attention(n, dtype, packed=False):
        def run():  # packed: the model's form, qkv [T, 3, H, Dh] with the linear's float32 bias fused
            h, d = 12, 64
            lens = torch.tensor([n, max(1, n - 7), max(1, n // 2)])
            cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
            if packed:
                qkv = torch.randn(int(lens.sum()), 3, h, d, dtype=dtype, requires_grad=True)
                bias = torch.zeros(3 * h * d, requires_grad=True)
                triton_qkv_attention(qkv, bias, cu, n).float().sum().backward()
                return
            q, k, v = (torch.randn(int(lens.sum()), h, d, dtype=dtype, requires_grad=True) for _ in range(3))
            triton_attention(q, k, v, cu, n).float().sum().backward()
        return run

    def rpq():
        x = torch.randn(4, 128, 1008)  # fp32 log-mel [B, F, T]
        proj = torch.randn(1, 256, 16)
        cb = torch.nn.functional.normalize(torch.randn(1, 8192, 16), dim=-1)
        K.rpq_codes(x, proj, cb, impl="triton")
        K.rpq_codes(x, proj, cb, norm="patch", impl="triton")
        K.rpq_codes(x, proj, cb, norm="bin", bin_mean=torch.zeros(128), bin_std=torch.ones(128), impl="triton")

    def head(dtype):
        def run():
            h = torch.randn(512, 768, dtype=dtype, requires_grad=True)
            w = (torch.randn(1, 8192, 768) * 0.02).to(dtype).requires_grad_()
            b = torch.zeros(1, 8192, dtype=dtype, requires_grad=True)
            t = torch.randint(0, 8192, (512, 1))
            loss, _ = K.linear_cross_entropy(h, w, b, t, impl="triton")
            loss.backward()
        return run

    def drop_path(dtype):
        def run():
            x, branch = (torch.randn(308, 768, dtype=dtype, requires_grad=True) for _ in range(2))
            K.residual_drop_path(x, branch, torch.rand(308), impl="triton").float().sum().backward()
        return run

    def add_norm(scaled):  # the fused residual add + LayerNorm as the model runs it: float32 stream, bf16 branch
        def run():
            x = torch.randn(308, 768, requires_grad=True)
            branch = torch.randn(308, 768, dtype=torch.bfloat16, requires_grad=True)
            w, b = (torch.ones(768, requires_grad=True) for _ in range(2))
            s, y = K.add_layer_norm(x, branch, torch.rand(308) if scaled else None, w, b,
                                    out_dtype=torch.bfloat16, impl="triton")
            torch.autograd.backward((s, y), (torch.ones_like(s), torch.ones_like(y)))
        return run

    def tokens(dtype):  # the bench's forms: tokens in the training dtype, float32 position tables
        def run():
            x = torch.randn(4, 128, 768, dtype=dtype, requires_grad=True)
            pos = torch.randn(128, 768, requires_grad=True)
            keep = torch.stack([torch.randperm(128) for _ in range(4)])
            K.gather_tokens(x, keep[:, :60], pos, impl="triton").float().sum().backward()
            ctx = torch.randn(4, 60, 768, dtype=dtype, requires_grad=True)
            fill = torch.randn(768, requires_grad=True)
            K.scatter_tokens(ctx, keep[:, :60], fill, keep[:, 60:], pos, impl="triton").float().sum().backward()
        return run

    def rpq_rows():  # patch rows [M, 256] (not the log-mel), with the quantizer's index path elsewhere
        x = torch.randn(1000, 256)
        K.rpq_codes(x, torch.randn(1, 256, 16), torch.nn.functional.normalize(torch.randn(1, 8192, 16), dim=-1),
                    impl="triton")

    out = {"model step bf16": model_step(torch.bfloat16), "model step fp32": model_step(torch.float32),
           "tokens bf16": tokens(torch.bfloat16), "tokens fp32": tokens(torch.float32), "rpq rows": rpq_rows,
           "drop path bf16": drop_path(torch.bfloat16), "drop path fp32": drop_path(torch.float32),
           "add norm": add_norm(False), "add norm scaled": add_norm(True)}
    for n in (64, 128, 256):
        for dt in (torch.bfloat16, torch.float32):
            out[f"attention N={n} {str(dt)[6:]}"] = attention(n, dt)
        out[f"qkv attention N={n} bf16"] = attention(n, torch.bfloat16, packed=True)
    for cfg in sweep:  # bench.gpu_probe's tuning configs (BESTRQ2_ATTN_CFG), bf16 as trained
        for n in (128, 256):
            out[f"attention N={n} cfg {cfg}"] = partial(with_env, "BESTRQ2_ATTN_CFG", cfg, attention(n, torch.bfloat16))
    out |= {"rpq": rpq, "rpq split": partial(with_env, "BESTRQ2_RPQ_SPLIT", "4", rpq)}
    out |= {"head bf16": head(torch.bfloat16), "head fp32": head(torch.float32)}
    return out


_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64",
           "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _signature(kernel, args: tuple, kwargs: dict):
    """(argument types, constexprs, launch options) of one recorded launch: what tells launches apart."""
    import torch

    names = kernel.arg_names
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
    values = dict(zip(names, args)) | kwargs
    sig, const = {}, {}
    for p in kernel.params:
        v = values.get(p.name, p.default if p.has_default else None)
        if p.is_constexpr or v is None:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _DTYPES[str(v.dtype).split(".")[-1]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {p.name} of type {type(v).__name__}")
    return sig, const, options


_DISTINCT: dict = {}
_SASS_DIR = ""  # --sass: where each compiled kernel's SASS goes
_JIT_RUN = None  # JITFunction.run before the recorder replaced it


class _TargetOnlyDriver:
    """Stands in for triton's CUDA driver on a machine without one: names the target and device 0, so that
    ``JITFunction.run(..., warmup=True)`` specialises the arguments exactly as a launch on the card would
    (integer 1s as constants, 16-byte divisibility of pointers and integers) and compiles, without loading
    or launching anything."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:  # noqa: ARG002
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self) -> bool:
        return True


def _cuobjdump(cubin: bytes | None, flag: str) -> str:
    """``cuobjdump <flag>`` (shipped with triton) on a cubin, or "" where it cannot be run."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _resource_usage(cubin: bytes | None) -> tuple[str, int]:
    """(registers per thread, stack bytes per thread) from ``cuobjdump --dump-resource-usage``; a stack
    means spilled registers: local-memory traffic a fast kernel should not have."""
    import re

    out = _cuobjdump(cubin, "--dump-resource-usage")
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (reg.group(1) if reg else "?"), int(stack.group(1)) if stack else 0


def instruction_mix(sass: str) -> dict:
    """What a kernel issues, read from its SASS: ``total`` instructions, ``mma`` {tensor-core opcode:
    count} (HMMA: mma.sync, HGMMA: Hopper's wgmma), and ``loops``: per loop (a backward branch) its body's
    instruction count, tensor-core instructions and barriers. A loop's body length is what every
    iteration issues per warp, the cost of an issue-bound kernel such as the RPQ's scoring loop."""
    import re
    from collections import Counter

    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip()).split()[0]))
    ops = Counter(op for _, op in ins)
    is_mma = re.compile(r"^(HMMA|HGMMA|IMMA|IGMMA|QGMMA|UTCHMMA|UTCQMMA)\b").match
    loops = []
    for addr, line in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)", sass):
        a, target = int(addr, 16), int(line, 16)
        if target < a:
            body = [op for ad, op in ins if target <= ad <= a]
            loops.append({"instructions": len(body), "mma": sum(1 for op in body if is_mma(op)),
                          "barriers": sum(1 for op in body if op.startswith("BAR.SYNC"))})
    return {"total": len(ins), "mma": {op: n for op, n in sorted(ops.items()) if is_mma(op)}, "loops": loops}


def _mix_text(mix: dict) -> str:
    mma = ", ".join(f"{n} {op}" for op, n in mix["mma"].items()) or "no tensor-core instructions"
    loops = "; ".join(f"{lp['instructions']} ({lp['mma']} mma, {lp['barriers']} bar)" for lp in mix["loops"])
    return f"{mix['total']} SASS ({mma})" + (f", loop bodies {loops}" if loops else "")


def written_args(kernel, args: tuple, kwargs: dict) -> tuple[list[str], list[str]] | None:
    """(the tensor arguments a launch writes through, as torch.compile's own analysis of the kernel's TTIR
    for the active target finds them; "written ~ other" pairs of those that share memory with another
    tensor argument), or None where that analysis is unavailable. Under torch.compile each written argument
    is functionalised as a copy of its own: two pointers into one tensor, one of them written, lose writes
    there (or read stale data) while eager runs right; and an input the analysis takes for written (a
    pointer handed to a helper whose results address a store) is copied before every launch."""
    import torch

    try:
        from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
    except ImportError:
        return None
    names = kernel.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    try:
        rw = identify_accessed_tensors(kernel, values, {}).read_writes
        writes = {d.name for d in rw.writes} & set(tensors)
        accessed = writes | ({d.name for d in rw.reads} & set(tensors))
    except Exception:  # noqa: BLE001 (an internal API: report it as unavailable, never as a finding)
        return None
    if writes == set(tensors) and len(tensors) > 2:
        return None  # torch's fallback when its analysis fails: "every input is mutated"
    storage = {k: t.untyped_storage().data_ptr() for k, t in tensors.items()}
    written = [n for n in names if n in writes]
    # (a placeholder for a pointer the kernel's constexprs leave unused is not accessed: no hazard)
    return written, [f"{w} ~ {o}" for w in written for o in names
                     if o in accessed and o != w and storage[o] == storage[w]]


def _compile_one(job: tuple) -> tuple[str, str | None]:
    """Compile one distinct launch for one target (in a forked worker): (report line, failure or None)."""
    from triton.runtime import driver

    arch, key = job
    kernel, args, kwargs, const, options = _DISTINCT[key]
    name, limit = key[0], SMEM_LIMIT.get(arch)
    shown = ", ".join(f"{k}={v}" for k, v in const.items() if v is not None)
    t = time.time()
    driver.set_active(_TargetOnlyDriver(arch))
    kernel.device_caches.clear()  # binders are per target: a worker compiles for several
    try:
        c = _JIT_RUN(kernel, *args, grid=(1,), warmup=True, **kwargs)
    except Exception as err:  # noqa: BLE001 (every compile error is reported, then the next)
        msg = str(err).strip().splitlines()
        return (f"  sm_{arch} FAIL {name}({shown}) {options or ''}: {msg[-1] if msg else type(err).__name__}",
                f"sm_{arch} {name}({shown}): {type(err).__name__}: {' | '.join(msg[-3:])}")
    smem = c.metadata.shared
    ok = limit is None or smem <= limit
    regs, stack = _resource_usage(c.asm.get("cubin"))
    spill = f", SPILLS {stack} B/thread to the stack" if stack else ""
    sass = _cuobjdump(c.asm.get("cubin"), "-sass")
    if _SASS_DIR and sass:
        import hashlib

        folder = os.path.join(_SASS_DIR, f"sm_{arch}")
        os.makedirs(folder, exist_ok=True)
        tag = hashlib.sha1(repr(key).encode()).hexdigest()[:8]
        with open(os.path.join(folder, f"{name}.{tag}.sass"), "w") as f:
            f.write(f"// {name}({shown}) {options or ''}\n{sass}")
    mix = f", {_mix_text(instruction_mix(sass))}" if sass else ""
    found = written_args(kernel, args, kwargs)
    written, aliased = found if found is not None else ([], [])
    alias = (", writes unchecked" if found is None else f", writes [{' '.join(written)}]"
             + (f" ALIASED {'; '.join(aliased)}" if aliased else ""))
    ok_all = ok and not aliased
    line = (f"  sm_{arch} {'ok  ' if ok_all else 'FAIL'} {name}({shown}) {options or ''}: shared {smem:,} B, "
            f"{regs} registers{spill}{mix}{alias}, {time.time() - t:.1f} s")
    if aliased:
        return line, f"sm_{arch} {name}({shown}): written arguments share memory with others: {'; '.join(aliased)}"
    return line, None if ok else f"sm_{arch} {name}({shown}): shared memory {smem:,} B > {limit:,}"


FRESH = {"aten.empty.memory_format", "aten.empty_like.default", "aten.zeros.default", "aten.empty_strided.default"}
IN_PLACE_BY_DESIGN = {"arg_ptr"}  # the RPQ's rescoring launch updates the codes of near-tie rows in place


def trace_step(preset: str = "tiny") -> dict:
    """The GPU path's training step through torch.compile, on this machine: every op on Triton (the packed
    attention included) under bf16 autocast, ``forward_batch`` compiled with ``fullgraph=True`` (a graph break
    raises) by AOTAutograd, forward and backward run with the kernels recorded instead of run, under the
    stand-in sm_90 driver (torch.compile's mutation analysis builds each kernel's TTIR for it). Returns
    {"launches": kernel launches recorded, "cloned": {(argument, what made it): count}}: the tensors the
    functional graphs copy before a kernel writes them. Copies of fresh allocations (empty, zeros) are free
    (inductor writes in place); any other is a real copy of an input before every launch."""
    import collections

    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional
    from triton.runtime import driver

    from bestrq2 import BestRQ2, BestRQ2Config
    from bestrq2.config import OPS

    launches = record_launches()
    driver.set_active(_TargetOnlyDriver(90))
    torch.manual_seed(0)
    model = BestRQ2(BestRQ2Config.preset(preset, encoder_drop_path=0.1, kernels={op: "triton" for op in OPS}))
    batch = model.prepare(torch.randn(2, 48_000) * 0.1)
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(model.forward_batch, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step(batch)
    out.loss.backward()
    cloned: collections.Counter = collections.Counter()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.target is triton_kernel_wrapper_functional:
                for name in node.kwargs["tensors_to_clone"]:
                    src = node.kwargs["kwargs"][name]
                    cloned[(name, str(getattr(src, "target", getattr(src, "op", "?"))))] += 1
    return {"launches": len(launches), "graphs": len(graphs), "backend": model.encoder.attention_backend,
            "cloned": dict(cloned)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="CUDA compute capabilities (90: H100/H200)")
    ap.add_argument("--sweep", action="store_true", help="also bench.gpu_probe's attention tuning configs")
    ap.add_argument("--only", default="", help="scenarios whose name contains one of these (comma-separated)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel (forked workers)")
    ap.add_argument("--sass", default="", metavar="DIR", help="also write each kernel's SASS under DIR/sm_<arch>/")
    ap.add_argument("--trace-step", action="store_true",
                    help="instead: the Triton path's training step through torch.compile(fullgraph=True), the kernels "
                         "recorded; lists what its functional graphs copy before a kernel writes it (trace_step)")
    args = ap.parse_args(argv)
    global _SASS_DIR
    _SASS_DIR = args.sass
    from bestrq2.env import read

    if read("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: under the interpreter the launchers pick interpreter configs")
        return 2
    if args.trace_step:
        r = trace_step()
        print(f"compiled step (fullgraph, aot): {r['graphs']} graphs (forward, backward), {r['launches']} kernel "
              f"launches recorded, attention {r['backend']}")
        bad = {k: n for k, n in r["cloned"].items() if k[1] not in FRESH and k[0] not in IN_PLACE_BY_DESIGN}
        for (name, src), n in sorted(r["cloned"].items(), key=lambda kv: -kv[1]):
            print(f"  {n:3d} x {name:12s} copied before a kernel writes it, made by {src}"
                  + ("  <- an input copied every launch" if (name, src) in bad else ""))
        print(f"{len(bad)} kinds of input copied before a kernel" if bad else "no input is copied before a kernel")
        return 1 if bad else 0
    import triton

    t0 = time.time()
    print(f"triton {triton.__version__}: capturing launches")
    sweep = []
    if args.sweep:
        from bench.gpu_probe import DEFAULT_CONFIGS

        sweep = [c for c in DEFAULT_CONFIGS.split(";") if c != "default"]
    launches = _capture(sweep, [o for o in args.only.split(",") if o])
    failures = [f"scenario {name} failed before launching" for k, name, _ in launches if k is None]
    distinct: dict[tuple, tuple] = {}
    for kernel, a, kw in launches:
        if kernel is None:
            continue
        sig, const, options = _signature(kernel, a, kw)
        key = (kernel.__name__, tuple(sig.items()), tuple((k, repr(v)) for k, v in const.items()),
               tuple(sorted(options.items())))
        distinct.setdefault(key, (kernel, a, kw, const, options))
    print(f"{len(launches)} launches, {len(distinct)} distinct; compiling for sm_{', sm_'.join(map(str, args.arch))}")
    jobs = [(arch, key) for arch in args.arch for key in distinct]
    global _DISTINCT
    _DISTINCT = distinct
    import multiprocessing as mp

    with mp.get_context("fork").Pool(max(1, min(args.jobs, len(jobs)))) as pool:  # forked: the kernels are in memory
        for line, failure in pool.imap(_compile_one, jobs):
            print(line, flush=True)
            if failure:
                failures.append(failure)
    print(f"{len(distinct)} kernels x {len(args.arch)} targets in {time.time() - t0:.0f} s: "
          + ("all compile within shared memory" if not failures else f"{len(failures)} failures"))
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
