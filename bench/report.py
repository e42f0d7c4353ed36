"""python -m bench.report: PNG plots and markdown tables from bench/results/*.csv into bench/README.md.

Each suite's latest run (its newest date) is shown; smoke runs are left out unless --smoke.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _x(v) -> str:
    """A ratio cell; '-' where the row has none (e.g. a variant timed in a run without (a))."""
    return "-" if v is None else f"{v:.2f}x"


def load(path: Path) -> list[dict]:
    """The newest row of every (op, provider, mode, shape, metric, device): a partial rerun (--only)
    replaces just the rows it measured."""
    latest: dict[tuple, dict] = {}
    for r in csv.DictReader(open(path)):
        key = (r["op"], r["provider"], r["mode"], r["shape"], r["metric"], r["device"])
        if key not in latest or r["date"] >= latest[key]["date"]:
            latest[key] = r
    return sorted(latest.values(), key=lambda r: r["date"])


def index(rows):
    """(op, provider, mode, shape) -> {metric: float}."""
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        out[(r["op"], r["provider"], r["mode"], r["shape"])][r["metric"]] = float(r["value"])
    return out


def fmt_bytes(b: float | None) -> str:
    return "" if b is None else f"{b / 2**20:.0f} MiB"


def ops_table(idx) -> list[str]:
    lines = ["| op | shape | mode | provider | median ms (p20-p80) | graph ms | GB/s | TFLOP/s | % of bound | x reference "
             "(graph) | x compile | peak mem |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted(k for k in idx if k[0] in ("rpq_codes", "gather_tokens", "scatter_tokens", "linear_cross_entropy", "attention",
                                            "layer_norm", "bias_gelu", "residual_drop_path", "add_layer_norm",
                                            "logmel_power")
                  and "time_ms" in idx[k])
    for op, prov, mode, shape in keys:
        m = idx[(op, prov, mode, shape)]
        bound = m.get("pct_of_copy_bound", m.get("pct_of_matmul_bound"))
        ref = m.get("speedup_vs_reference")
        gbps = "" if "gbps" not in m else f"{m['gbps']:.1f}"
        tflops = "" if "tflops" not in m else f"{m['tflops']:.3f}"
        graph = "" if "time_graph_ms" not in m else f"{m['time_graph_ms']:.3f}"
        x_ref = "" if ref is None else f"{ref:.2f}x" + (f" ({m['speedup_vs_reference_graph']:.2f}x)"
                                                        if "speedup_vs_reference_graph" in m else "")
        comp = m.get("speedup_vs_compile", m.get("speedup_vs_compile_chunked"))
        lines.append(f"| {op} | {shape} | {mode} | {prov} | {m['time_ms']:.3f} ({m.get('time_p20_ms', 0):.3f}-"
                     f"{m.get('time_p80_ms', 0):.3f}) | {graph} | {gbps} | {tflops} | "
                     f"{'' if bound is None else f'{bound:.1f}%'} | {x_ref} | {'' if comp is None else f'{comp:.2f}x'} | "
                     f"{fmt_bytes(m.get('peak_mem_bytes'))} |")
    return lines


def e2e_table(idx) -> list[str]:
    """One row per variant; a cell the variant has no figure for is '-' ((c) through the dispatcher and the
    pretrain loop (e) record clips/s without an MFU; x (a) and x plain compile only where those ran with it)."""
    keys = sorted(k for k in idx if k[0] == "pretrain_step" and "clips_per_s" in idx[k])
    if not keys:
        return []
    lines = ["| variant | shape | clips/s (min-max) | step ms | MFU (vs measured matmul) | MFU (vs spec) | x (a) | "
             "x plain compile | peak mem |", "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for k in keys:
        m = idx[k]
        spread = f" ({m['clips_per_s_min']:.0f}-{m['clips_per_s_max']:.0f})" if "clips_per_s_min" in m else ""
        step = m.get("step_ms")
        lines.append(f"| {k[1]} | {k[3]} | {m['clips_per_s']:.1f}{spread} | {'-' if step is None else f'{step:.1f}'} | "
                     f"{pct(m.get('mfu_vs_measured_matmul'))} | {pct(m.get('mfu_vs_spec_bf16'))} | "
                     f"{_x(m.get('speedup_vs_a'))} | {_x(m.get('ratio_vs_plain_compile'))} | "
                     f"{fmt_bytes(m.get('peak_mem_bytes'))} |")
    return lines


def inference_table(idx) -> list[str]:
    shapes = sorted({k[3] for k in idx if k[0] == "encoder_inference"})
    if not shapes:
        return []
    lines = ["| shape | provider | ms/clip | clips/s | x eager | max abs diff vs eager |", "|---|---|---|---|---|---|"]
    order = ["eager", "fast", "bf16", "onnxruntime", "onnxruntime_portable"]
    for s in shapes:
        provs = sorted({k[1] for k in idx if k[0] == "encoder_inference" and k[3] == s},
                       key=lambda p: order.index(p) if p in order else 99)
        for p in provs:
            m = idx[("encoder_inference", p, "forward", s)]
            x = "1.00x" if p == "eager" else f"{m.get('speedup_vs_eager', float('nan')):.2f}x"
            d = "" if p == "eager" else f"{m.get('max_abs_diff_vs_eager', float('nan')):.1e}"
            lines.append(f"| {s} | {p} | {m['ms_per_clip']:.1f} | {m['clips_per_s']:.2f} | {x} | {d} |")
    return lines


def _simple_table(idx, op: str, header: str, row) -> list[str]:
    """A markdown table of every row of ``op`` (``row(key, metrics)`` -> its cells), or [] when none."""
    keys = sorted(k for k in idx if k[0] == op)
    if not keys:
        return []
    separator = "|" + "|".join("---" for _ in header.strip(" |").split("|")) + "|"
    return [header, separator] + [row(k, idx[k]) for k in keys]


def memory_table(idx) -> list[str]:
    mem = {k: v for k, v in idx.items() if "peak_mem_bytes" in v}
    return _simple_table(mem, "linear_cross_entropy", "| provider | shape | peak extra memory |",
                         lambda k, m: f"| {k[1]} | {k[3]} | {fmt_bytes(m['peak_mem_bytes'])} |")


def pipeline_table(idx) -> list[str]:
    return _simple_table(idx, "data_pipeline", "| step | ms per call | clips/s per core |",
                         lambda k, m: f"| {k[1]} | {m['time_ms']:.2f} | {m['clips_per_s_per_core']:.1f} |")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(name: str, idx, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    sp = sorted((k, m["speedup_vs_reference"]) for k, m in idx.items() if "speedup_vs_reference" in m)
    if sp:
        fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(sp))))
        labels = [f"{k[0]} {k[2]} [{k[3]}] {k[1]}" for k, _ in sp]
        ax.barh(range(len(sp)), [v for _, v in sp], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(sp)), labels, fontsize=6)
        ax.set_xlabel("speed-up over the reference op (x)")
        ax.set_title(f"{name}: fast paths vs references")
        made.append(_save(fig, out_dir / f"{name}_speedups.png"))
    att = defaultdict(dict)
    for (op, prov, mode, shape), m in idx.items():
        if op == "attention" and mode == "full" and "time_ms" in m:
            n = int(shape.split("N=")[1].split(",")[0])
            att[prov][n] = m["time_ms"]
    if att:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for prov, pts in sorted(att.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=prov)
        ax.set_xlabel("tokens per sequence N (same total tokens)")
        ax.set_ylabel("forward + backward, ms")
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.set_title(f"{name}: attention backends")
        made.append(_save(fig, out_dir / f"{name}_attention.png"))
    e2e = sorted((k[1], m["clips_per_s"]) for k, m in idx.items() if k[0] == "pretrain_step" and "clips_per_s" in m)
    if e2e:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([n for n, _ in e2e], [v for _, v in e2e], color="tab:green")
        ax.set_ylabel("clips / s")
        ax.set_title(f"{name}: pretraining throughput")
        plt.setp(ax.get_xticklabels(), rotation=20, fontsize=7)
        made.append(_save(fig, out_dir / f"{name}_e2e.png"))
    return made


def render(smoke: bool = False) -> str:
    parts = []
    for path in sorted(RESULTS.glob("*.csv")):
        if path.stem.endswith("smoke") and not smoke:
            continue
        all_rows = load(path)
        # one section per device: figures of different machines never share a table
        devices = sorted({r["device"] for r in all_rows}, key=lambda d: max(r["date"] for r in all_rows if r["device"] == d))
        for device in reversed(devices):  # the newest machine first
            parts += _render_device(path, [r for r in all_rows if r["device"] == device], len(devices) > 1)
    return "\n".join(parts) if parts else "_No results yet: run `python -m bench --suite cpu` or `--suite gpu`._"


def _render_device(path: Path, rows: list[dict], several: bool) -> list[str]:
    parts: list[str] = []
    if rows:
        idx = index(rows)
        meta = rows[-1]
        vers = json.loads(meta["versions"])
        runs = sorted({(r["date"], r["commit"], r["command"]) for r in rows})
        bounds = {r["provider"]: float(r["value"]) for r in rows if r["op"] == "bound"}
        name = re.sub(r"[^a-z0-9]+", "-", meta["device"].split(" (")[0].lower()).strip("-")[:32]
        slug = path.stem if not several else f"{path.stem}-{name}"
        parts += [f"### Suite `{path.stem}`" + (f" on {meta['device'].split(' (')[0]}" if several else ""), "",
                  f"Device: **{meta['device']}**. Versions: {', '.join(f'{k} {v}' for k, v in vers.items())}. "
                  "Runs: " + "; ".join(f"`{c}` at commit `{h}`, {d}" for d, h, c in runs) + ".", "",
                  "Bounds measured in the latest run (each row's % of bound uses its own run's): " + ", ".join(
                      f"{k} {v:.3g} {'GB/s' if k == 'copy' else 'TFLOP/s'}" for k, v in bounds.items()) + ".", ""]
        for title, table in (("Pretraining step (end to end)", e2e_table(idx)), ("Encoder inference", inference_table(idx)),
                             ("Head + cross-entropy: peak extra memory", memory_table(idx)),
                             ("Ops", ops_table(idx)), ("Data pipeline (pytest-benchmark)", pipeline_table(idx))):
            if table and len(table) > 2:
                parts += [f"#### {title}", "", *table, ""]
        for p in plots(slug, idx, RESULTS / "plots"):
            parts += [f"![{p.stem}](results/plots/{p.name})", ""]
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("--smoke", action="store_true", help="include smoke runs")
    args = ap.parse_args(argv)
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + START + "\n" + render(args.smoke) + "\n" + END + tail)
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
