"""Peak memory of one head computation, CPU, in a fresh process (used by the CPU suite).

python -m bench.memprobe IMPL M D K [CHUNK]   IMPL: reference | torch
Prints JSON: {"impl", "peak_bytes", "loss"}. The peak is the process's high-water RSS during
forward + backward (reset just before, via /proc/self/clear_refs) minus its RSS at that moment, when
the inputs and their grad buffers already exist.
"""
import json
import sys

import torch

from bestrq2.kernels import linear_cross_entropy


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def main() -> None:
    impl, m, d, k = sys.argv[1], *map(int, sys.argv[2:5])
    chunk = int(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.manual_seed(0)
    h = torch.randn(m, d, requires_grad=True)
    w = (torch.randn(1, k, d) * 0.02).requires_grad_()
    b = torch.zeros(1, k, requires_grad=True)
    t = torch.randint(0, k, (m, 1))
    h.grad = torch.zeros_like(h)  # the grads exist in both cases: count only the extra memory
    w.grad = torch.zeros_like(w)
    b.grad = torch.zeros_like(b)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = _status_kb("VmRSS") * 1024
    loss, _ = linear_cross_entropy(h, w, b, t, chunk=chunk, impl=impl)
    loss.backward()
    peak = _status_kb("VmHWM") * 1024
    print(json.dumps({"impl": impl, "peak_bytes": peak - base, "loss": loss.item()}))


if __name__ == "__main__":
    main()
