"""Training steps on a CPU: float32 against ``--precision bf16``, each also as it ran before 2026-12-03 (foreach
AdamW, bf16 attention backward in bf16), all interleaved in one process.

``python -m bench.train_cpu [--preset base] [--batch 8] [--rounds 5]`` prints the median step time of each
variant and the ratios (``results/train_cpu.txt``). Steps run through ``bestrq2.train.train_step``, as the
training loop runs them (shared mask of 64 of 128 patches, 10 s clips). The "before" variants differ in two
things only: ``torch.optim.AdamW(foreach=True)`` instead of ``make_optimizer``'s fused one, and, in bf16, SDPA
called on bf16 inputs where the model now passes float32 copies (a stand-in for ``F`` inside
``bestrq2.attention`` turns them back to bf16).
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
import torch.nn.functional as F


def _sdpa_as_before(state: dict):
    """``bestrq2.attention``'s ``F`` with SDPA that, for a "before" bf16 variant, runs on bf16 again (where torch's
    CPU kernel runs bf16 at all: under a narrowed ATen it ran in float32 before too)."""
    from bestrq2.attention import cpu_bf16_sdpa_works

    shim = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    bf16_runs = cpu_bf16_sdpa_works()

    def sdpa(q, k, v, **kw):
        if state["before_bf16"] and q.dtype == torch.float32 and bf16_runs:
            return F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
        return F.scaled_dot_product_attention(q, k, v, **kw)

    shim.scaled_dot_product_attention = sdpa
    return shim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import bestrq2.attention as attention
    from bestrq2 import BestRQ2, BestRQ2Config
    from bestrq2.precision import cpu_bf16_units
    from bestrq2.train import TrainConfig, make_optimizer, train_step

    state = {"before_bf16": False}
    attention.F = _sdpa_as_before(state)
    dev = torch.device("cpu")
    runs = {}
    for prec in ("fp32", "bf16"):
        for when in ("before", "now"):
            torch.manual_seed(0)
            model = BestRQ2(BestRQ2Config.preset(args.preset))
            tc = TrainConfig(batch_size=args.batch, precision=prec)
            opt = (torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
                   if when == "before" else make_optimizer(model.parameters(), tc, dev))
            runs[(prec, when)] = (model, tc, opt)
    wave = torch.randn(args.batch, 160_000) * 0.1
    lengths = torch.full((args.batch,), 160_000)
    mask = torch.zeros(args.batch, 128, dtype=torch.bool)
    mask[:, torch.randperm(128)[:64]] = True
    times = {key: [] for key in runs}
    losses = {key: [] for key in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for key, (model, tc, opt) in runs.items():
            state["before_bf16"] = key == ("bf16", "before")
            t0 = time.perf_counter()
            stats = train_step(model, model, model, opt, tc, wave, lengths, mask, dev, 1, False)
            if r:
                times[key].append(time.perf_counter() - t0)
            losses[key].append(float(stats[0]))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"{args.preset}, {args.batch} clips of 10 s a step, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"bf16 units {cpu_bf16_units()}; median of {args.rounds} steps each, interleaved")
    for prec in ("fp32", "bf16"):
        b, n = med[(prec, "before")], med[(prec, "now")]
        print(f"  {prec}: before {1e3 * b:7.0f} ms   now {1e3 * n:7.0f} ms   before / now {b / n:.2f}x   "
              f"losses now {' '.join(f'{x:.3f}' for x in losses[(prec, 'now')])}")
    print(f"  bf16 against fp32: before {med[('fp32', 'before')] / med[('bf16', 'before')]:.2f}x   "
          f"now {med[('fp32', 'now')] / med[('bf16', 'now')]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
