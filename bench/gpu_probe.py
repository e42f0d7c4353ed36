"""Tuning sweep for the Triton attention kernel on a GPU: block sizes, warps and stages.

    python -m bench.gpu_probe [--lengths 64,77,128,256] [--tokens 32768] [--configs "64,64,4,2;128,64,8,2"]
                              [--wins]

For each sequence length and config (``BESTRQ2_ATTN_CFG=bm,bn,warps,stages``; ``default`` is the
kernel's own choice, what the model runs) it times attention as the model's ``Attention`` runs it, forward
and forward+backward (triton.testing.do_bench, median ms), on the qkv linear's output [T, 3, H=12, Dh=64]
in bf16: the Triton form takes it without the linear's bias and fuses the bias (its backward gives qkv's
gradient as one tensor and the bias gradient); the SDPA form takes it with the bias already added (free in
the GEMM's epilogue), unbinds q, k, v, and its backward pays what the model's does, the stack of three
gradients and the bias-gradient sum over qkv's gradient. Both in the same run, output checked against SDPA. Prints a table and appends rows to
bench/results/sweeps/gpu-attention.csv. ``--wins`` also records the default config's ratios to SDPA for
this card in bestrq2/attention_wins.json, which ``auto`` attention reads (``bestrq2.attention``):
commit that file, and the model picks the Triton kernel where it measured faster.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

DEFAULT_CONFIGS = "default;64,64,4,2;64,64,4,3;128,64,8,2;64,32,4,2;128,128,8,2;32,32,4,2;64,128,4,2"


def wins_from_rows(rows: list[dict], head_dim: int = 64, dtype: str = "bfloat16") -> list[dict]:
    """The ``default`` config's rows as attention_wins.json entries: Triton over SDPA per length and pass."""
    out = []
    for r in rows:
        if r["cfg"] != "default":
            continue
        for kind, ours, theirs in (("forward", "fwd_ms", "sdpa_fwd_ms"), ("train", "fwdbwd_ms", "sdpa_fwdbwd_ms")):
            out.append({"max_len": int(r["N"]), "head_dim": head_dim, "dtype": dtype, "pass": kind,
                        "triton_over_sdpa": round(float(r[theirs]) / float(r[ours]), 4),
                        "form": r.get("form", "q,k,v"),
                        "measured": f"{r['date']} torch {r['torch']} triton {r['triton']}"})
    return out


def write_wins(path: Path, card: str, entries: list[dict]) -> dict:
    """Replace this card's entries in the wins table at ``path`` (other cards' stay)."""
    import json

    table = json.loads(path.read_text()) if path.is_file() else {}
    table[card] = sorted(entries, key=lambda e: (e["pass"], e["max_len"]))
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 77: the encoder's longest visible run at the paper's masks (128 patches, ratio >= 0.4). ``auto`` reads the
    # smallest measured length at or above a sequence's, and the kernel pads 65-128 tokens to one 128 tile
    # while SDPA's cost follows the length: the 128 row would flatter the Triton kernel for the encoder
    ap.add_argument("--lengths", default="64,77,128,256")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweeps" / "gpu-attention.csv"))
    ap.add_argument("--wins", action="store_true", help="write the default config's ratios to attention_wins.json")
    ap.add_argument("--wins-file", default="", help="where --wins writes (default bestrq2/attention_wins.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny run on the CPU under TRITON_INTERPRET=1, wall-clock timed (the test suite's check "
                         "that this script runs before device time is spent on it)")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    import triton

    from bench.common import time_fn

    from bestrq2.kernels.attention import triton_qkv_attention

    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        def do_bench(fn):
            return time_fn(fn, dev, reps=1, warmup=0)[0]
    else:
        from triton.testing import do_bench
    h, dh, dt = 12, 64, torch.bfloat16
    rows = []
    card = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)  # the name auto attention looks up
    meta = dict(device=card, torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), form="qkv+bias")
    for n in (int(x) for x in args.lengths.split(",")):
        b = args.tokens // n
        qkv = torch.randn(b * n, 3, h, dh, device=dev, dtype=dt, requires_grad=True)
        bias = torch.zeros(3 * h * dh, device=dev, requires_grad=True)  # float32, as the linear's under autocast
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=dev)
        do = torch.randn(b * n, h, dh, device=dev, dtype=dt)

        def sdpa():
            q, k, v = qkv.view(b, n, 3, h, dh).unbind(2)
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))
                                                  ).transpose(1, 2).reshape(b * n, h, dh)

        def sdpa_train():  # qkv's gradient (unbind's backward stacks three), then the linear's bias gradient
            (g,) = torch.autograd.grad(sdpa(), (qkv,), do)
            return g.view(b * n, -1).sum(0).float()

        def triton_fwd():
            return triton_qkv_attention(qkv, bias, cu, n)

        def triton_train():
            return torch.autograd.grad(triton_fwd(), (qkv, bias), do)

        ref = sdpa().detach().float()
        base_f = do_bench(sdpa)
        base_fb = do_bench(sdpa_train)
        print(f"N={n} B={b}: sdpa fwd {base_f:.3f} ms, fwd+bwd {base_fb:.3f} ms")
        for cfg in args.configs.split(";"):
            if cfg == "default":
                os.environ.pop("BESTRQ2_ATTN_CFG", None)
            else:
                os.environ["BESTRQ2_ATTN_CFG"] = cfg
            try:
                err = (triton_fwd().float() - ref).abs().max().item()
                tf = do_bench(triton_fwd)
                tfb = do_bench(triton_train)
            except Exception as e:  # a config the compiler rejects (shared memory, registers): report it
                print(f"  cfg {cfg}: failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            print(f"  cfg {cfg:12s} fwd {tf:.3f} ms ({base_f / tf:.2f}x sdpa)  fwd+bwd {tfb:.3f} ms "
                  f"({base_fb / tfb:.2f}x sdpa)  max|diff| vs sdpa {err:.2e}")
            rows.append(dict(N=n, B=b, cfg=cfg, fwd_ms=tf, fwdbwd_ms=tfb, sdpa_fwd_ms=base_f, sdpa_fwdbwd_ms=base_fb,
                             max_abs_diff=err, **meta))
        os.environ.pop("BESTRQ2_ATTN_CFG", None)
    if rows:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
        print(f"{len(rows)} rows -> {path}")
    if args.wins and rows:
        from bestrq2.attention import WINS_FILE

        entries = wins_from_rows(rows)
        path = Path(args.wins_file) if args.wins_file else WINS_FILE
        write_wins(path, meta["device"], entries)
        print(f"{len(entries)} entries for {meta['device']} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
