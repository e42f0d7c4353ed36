"""Command line: ``bestrq2 pretrain | prepare | export | embed | synth`` (each with --help)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import SAMPLE_RATE
from .cuda_graphs import MODES as GRAPH_MODES
from .precision import PRECISIONS


def _pretrain(args: argparse.Namespace) -> int:
    from .train import TrainConfig, pretrain, process_rank, run_total_steps

    out = args.resume or args.out
    if args.resume and args.out and args.out != args.resume:
        raise ValueError(f"--resume {args.resume} continues that run in place; drop --out {args.out}")
    if args.extend and not args.resume:
        raise ValueError("--extend changes the length of a resumed run; use it with --resume DIR")
    if args.overwrite and args.resume:
        raise ValueError("--overwrite starts a new run and --resume continues one: give one of them")
    steps = args.steps
    if steps is None:  # a resumed run keeps its own length; a new one runs 300 steps
        steps = run_total_steps(args.resume) if args.resume else 300
    tc = TrainConfig(preset=args.preset, steps=steps, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, seed=args.seed, out=out or "runs/demo", data=args.data,
                     seconds=args.seconds, ckpt_every=args.ckpt_every, keep=args.keep, num_workers=args.num_workers,
                     device=args.device, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
                     warmup_pct=args.warmup_pct, compile=args.compile, fsdp=args.fsdp,
                     max_bad_steps=args.max_bad_steps, progress=not args.no_progress,
                     overwrite=args.overwrite, extend=args.extend, precision=args.precision)
    model_cfg = None
    overrides = model_overrides(args)
    if overrides:
        from .config import BestRQ2Config

        model_cfg = BestRQ2Config.preset(args.preset, seed=args.seed, **overrides)
    res = pretrain(tc, model_cfg=model_cfg, resume=bool(args.resume))
    if process_rank()[0] != 0:
        return 0
    losses = res["losses"]
    if losses:
        k = max(1, len(losses) // 10)
        print(f"loss: first {k} steps {sum(losses[:k]) / k:.3f} -> last {k} steps {sum(losses[-k:]) / k:.3f}")
    print(f"encoder written to {Path(res['out']) / 'encoder'}")
    return 0


def model_overrides(args: argparse.Namespace) -> dict:
    """Preset fields the pretrain flags change (empty: the preset as it is)."""
    out: dict = {}
    if args.one_stage:
        out["one_stage"] = True
    if args.drop_path is not None:
        out["encoder_drop_path"] = args.drop_path
    if args.rpq_norm is not None:
        out["rpq_norm"] = args.rpq_norm
    if args.mask_ratio is not None:
        out["mask_ratio_min"], out["mask_ratio_max"] = args.mask_ratio
    if args.predictor_depth is not None:
        if args.one_stage:
            raise ValueError("--predictor-depth has no meaning with --one-stage (there is no predictor)")
        out["predictor_depth"] = args.predictor_depth
    return out


def _embed(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .data.folder import load_audio
    from .encoder import BestRQ2Encoder

    inputs = [Path(p) for p in args.inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise ValueError(f"no such file or directory: {', '.join(missing)}")
    single = len(inputs) == 1 and inputs[0].is_file() and args.out_dir is None
    if not single and args.out:
        raise ValueError("--out names the output of one input file; for several files or a folder use --out-dir")
    if not single and args.out_dir is None:
        raise ValueError("several files or a folder need --out-dir DIR (one .npy per file is written there)")
    enc = BestRQ2Encoder.from_pretrained(args.model, map_location=args.device, precision=args.precision,
                                         cuda_graphs=args.cuda_graphs)
    print(f"precision: {enc.precision_in_use}")
    if not single:
        return _embed_many(enc, inputs, args)
    wave = torch.from_numpy(load_audio(inputs[0]))[None]
    frames = enc(wave)[0].cpu().numpy()
    print(f"{inputs[0]}: {wave.shape[1] / SAMPLE_RATE:.2f} s -> {frames.shape[0]} frames x {frames.shape[1]} dims "
          f"(one per {enc.hop_size_in_ms:g} ms)")
    mean = frames.mean(0)
    print("clip embedding (mean over frames), first 8 dims:", np.array2string(mean[:8], precision=4))
    if args.out:
        np.save(args.out, mean if args.pool == "mean" else frames)
        print(f"{'clip embedding' if args.pool == 'mean' else 'frames'} saved to {args.out}")
    return 0


def _embed_many(enc, inputs: list[Path], args: argparse.Namespace) -> int:
    """``bestrq2 embed`` of several files or folders: one .npy per file under --out-dir, in batches; files
    whose output exists are skipped (a stopped run picks up where it was), failures listed at the end."""
    import time

    from .data.folder import EXTENSIONS, audio_files
    from .embedding import embed_files, output_path, save_npy

    out_dir = Path(args.out_dir)
    todo: dict[Path, Path] = {}  # audio file -> its .npy
    source: dict[Path, Path] = {}  # .npy -> its audio file
    for p in inputs:
        files = [(f, p) for f in audio_files(p)] if p.is_dir() else [(p, None)]
        if p.is_dir() and not files:
            print(f"{p}: no {'/'.join(sorted(e[1:] for e in EXTENSIONS))} files found", file=sys.stderr)
        for f, root in files:
            if f in todo:  # the same file named twice (a folder and a file in it)
                continue
            dest = output_path(out_dir, f, root)
            if dest in source:
                raise ValueError(f"{f} and {source[dest]} would both be written to {dest}: pass their common "
                                 "folder instead, or embed them in separate runs")
            todo[f], source[dest] = dest, f
    done = {f for f, d in todo.items() if d.exists()} if not args.overwrite else set()
    files = [f for f in todo if f not in done]
    if done:
        print(f"{len(done)} of {len(todo)} files already embedded in {out_dir} (skipped; --overwrite redoes them)")
    failed: list[tuple[str, str]] = []
    seconds, t0 = 0.0, time.perf_counter()
    for res in embed_files(enc, files, batch_size=args.batch_size, pool=args.pool,
                           progress=not args.no_progress, desc="embed"):
        if res.error is not None:
            failed.append((res.path, res.error))
            continue
        save_npy(todo[files[res.index]], res.frames.numpy())
        seconds += res.seconds
    wall = time.perf_counter() - t0
    ok = len(files) - len(failed)
    print(f"embedded {ok} files ({seconds:.1f} s of audio, {seconds / max(wall, 1e-9):.1f}x real time) into {out_dir}")
    report = out_dir / "embed_errors.tsv"
    if not failed:
        report.unlink(missing_ok=True)  # an earlier run's list: those files are done now
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(f"{p}\t{e}\n" for p, e in failed))
        print(f"{len(failed)} files failed (listed in {report}):", file=sys.stderr)
        for p, e in failed[:10]:
            print(f"  {p}: {e}", file=sys.stderr)
        return 1
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import time

    from .data.shards import prepare

    t0 = time.time()
    if args.debian:
        from .data.debian_corpus import prepare_debian

        if len(args.paths) != 1:
            raise ValueError("prepare --debian PKG[,PKG...] OUT: give only OUT (the audio comes from the packages)")
        out = args.paths[0]
        res = prepare_debian([p.strip() for p in args.debian.split(",") if p.strip()], out, cache=args.cache,
                             workers=args.workers, progress=not args.no_progress)
        for name, m in res["packages"].items():
            print(f"  {name} {m['version']}: {m['clips']} clips, {m['hours']:.2f} h ({', '.join(m['licences'][:4])})")
    else:
        if len(args.paths) != 2:
            raise ValueError("prepare SRC OUT: a folder of audio and the output folder")
        out = args.paths[1]
        res = prepare(args.paths[0], out, workers=args.workers, shard_mb=args.shard_mb, progress=not args.no_progress)
    args.out = out
    dt = time.time() - t0
    print(f"prepared {res['clips']} clips ({res['hours']:.2f} h of audio) in {dt:.1f} s -> {args.out}")
    if res["skipped"]:
        print(f"skipped {len(res['skipped'])} unreadable files (listed in {args.out}/skipped.json), e.g. "
              f"{next(iter(res['skipped']))}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoints import export_encoder

    used = export_encoder(args.ckpt, args.out)
    print(f"exported the encoder of {used} to {args.out} (config.json + model.safetensors)")
    if args.onnx or args.onnx_portable:
        from .encoder import BestRQ2Encoder

        path = BestRQ2Encoder.from_pretrained(args.out).to_onnx(Path(args.out) / "encoder.onnx",
                                                                portable=args.onnx_portable)
        ops = "standard ONNX ops" if args.onnx_portable else "onnxruntime's Attention op"
        print(f"and as ONNX to {path} (dynamic batch and length, {ops}; run it with bestrq2.onnx.OnnxEncoder)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from .encoder import BestRQ2Encoder
    from .eval.debian import DEFAULT_CACHE
    from .eval.experiment import builtin_tasks, evaluate_tasks, floors
    from .eval.stats import rounded
    from .eval.suite import markdown, paired, summarize, summarize_ci
    from .eval.tasks import read_manifest

    cache = Path(args.cache) if args.cache else DEFAULT_CACHE
    domains = args.domain or []
    if len(domains) > 1 and len(domains) != len(args.manifest):
        raise ValueError(f"--domain: give one for every --manifest (in order) or one for all; got {len(domains)} "
                         f"for {len(args.manifest)} manifests")
    specs = [(m, domains[i] if len(domains) > 1 else (domains[0] if domains else None), None)
             for i, m in enumerate(args.manifest)]
    # every manifest is read and checked before any audio is encoded: a bad one fails the call at once
    tasks = [read_manifest(m, name=name, domain=dom, seed=args.seed) for m, dom, name in specs]
    if args.prepare or args.builtin:
        made = builtin_tasks(cache, args.tasks.split(",") if args.tasks else None, seed=args.seed, limit=args.limit)
        print(f"built-in tasks ready under {cache}: {', '.join(t.name for t in made) or 'none'}")
        tasks += made
        if args.prepare and not args.model:
            return 0
    if not args.model:
        raise ValueError("--model: give the encoder directory to evaluate")
    if not tasks:
        raise ValueError("--manifest / --builtin: give at least one task")
    for t in tasks:
        if t.ignored_columns:
            print(f"task {t.name}: ignoring columns {', '.join(t.ignored_columns)}")
    enc = BestRQ2Encoder.from_pretrained(args.model, precision=args.precision)
    print(f"precision: {enc.precision_in_use}")
    encoders = {"model": enc}
    if args.baseline:
        encoders["baseline"] = BestRQ2Encoder.from_pretrained(args.baseline, precision=args.precision)
    encoders.update(floors(enc.config, args.seed, args.precision))  # random init (same architecture and
    # precision) and log-mel statistics
    seeds = tuple(range(args.seed, args.seed + args.seeds))
    results = evaluate_tasks(tasks, encoders, probe=args.probe, epochs=args.epochs, seed=args.seed, seeds=seeds,
                             cv=args.cv, progress=not args.no_progress, batch_size=args.batch_size)
    if not results:
        raise ValueError("no task could be evaluated")
    compare = ("model", "baseline") if args.baseline else ("model", "random_init")
    table = markdown(results, compare=compare)
    head = (f"Probe: {args.probe}" + (f" ({len(seeds)} seeds: mean)" if args.probe == "xares" else
                                       " (L2-regularised logistic regression, L2 chosen on val)")
            + (f"; {args.cv}-fold cross-validation over groups" if args.cv and args.cv != "groups" else
               "; leave-one-group-out" if args.cv == "groups" else "")
            + ". Test accuracy in %, [95% bootstrap interval over test clips].")
    print(head + "\n\n" + table)
    if args.out:
        out = Path(args.out)
        out.write_text(head + "\n\n" + table + "\n")
        out.with_suffix(".json").write_text(json.dumps(rounded({
            "probe": args.probe, "cv": args.cv, "seeds": list(seeds),
            "tasks": [r.__dict__ for r in results],  # hits per test clip: paired comparisons later
            "summary": summarize(results), "summary_ci": summarize_ci(results),
            "paired": {f"{compare[0]}-{compare[1]}": paired(results, *compare)}}), indent=1))
        print(f"report written to {out} (and {out.with_suffix('.json')})")
    return 0


def _cv_arg(s: str):
    """--cv: 'groups' or an integer K >= 3."""
    return s if s == "groups" else _int_at_least("--cv", 3)(s)


def _codes(args: argparse.Namespace) -> int:
    import json

    from .codes import report, run

    res = run(args.paths, run_dir=args.run, seed=args.seed, rpq_norm=args.rpq_norm, seconds=args.seconds,
              max_clips=args.max_clips, plot=args.plot)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def _synth(args: argparse.Namespace) -> int:
    import soundfile as sf

    from .data.synthetic import synth_clip

    sf.write(args.out, synth_clip(args.seed, args.index, args.seconds), SAMPLE_RATE)
    print(f"wrote {args.out} ({args.seconds:g} s of the procedural corpus, clip {args.index})")
    return 0


def _int_at_least(name: str, lowest: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lowest}, got {v}")
        return v
    return parse


def _positive_int(name: str):
    return _int_at_least(name, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bestrq2", description="BEST-RQ-2 audio pretraining and embedding")
    sub = p.add_subparsers(dest="command", required=True)

    pt = sub.add_parser("pretrain", help="pretrain a model (default: tiny model on the procedural corpus)")
    pt.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    pt.add_argument("--data", default=None, help="folder of audio files (wav/flac/ogg/opus/mp3) or a corpus made by "
                    "`bestrq2 prepare`; default: the procedural corpus")
    pt.add_argument("--steps", type=_positive_int("--steps"), default=None,
                    help="optimizer steps in all (default 300; a resumed run: its own total)")
    pt.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8, help="global batch (clips per step)")
    pt.add_argument("--grad-accum", type=_positive_int("--grad-accum"), default=1, help="micro-batches per step")
    pt.add_argument("--lr", type=float, default=1e-4)
    pt.add_argument("--weight-decay", type=float, default=0.05)
    pt.add_argument("--warmup-pct", type=float, default=0.05)
    pt.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm; 0 = off")
    pt.add_argument("--seconds", type=float, default=10.0, help="clip length")
    pt.add_argument("--drop-path", type=float, default=None, help="encoder drop-path rate (default: the preset's, 0.1)")
    pt.add_argument("--one-stage", action="store_true",
                    help="the paper's one-stage BEST-RQ (ViT) baseline: all tokens through the encoder, "
                         "masked ones replaced by the mask token, no predictor (a resumed run keeps its own setting)")
    pt.add_argument("--mask-ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="masked fraction drawn uniformly from [MIN, MAX] per step (paper: 0.4 0.6)")
    pt.add_argument("--predictor-depth", type=_positive_int("--predictor-depth"), default=None,
                    help="predictor blocks (default: the preset's; paper: 4)")
    pt.add_argument("--rpq-norm", default=None, choices=["none", "patch", "bin"],
                    help="quantizer input: none (the paper, raw dB), patch (each patch standardised), bin (the "
                         "log-mel standardised per mel bin with statistics of the corpus's first clips)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out", default=None, help="run directory (default runs/demo)")
    pt.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    pt.add_argument("--extend", action="store_true",
                    help="with --resume and a new --steps: continue the cosine from the current learning rate to "
                         "the new total, without a jump (the warm-up is kept as it was)")
    pt.add_argument("--overwrite", action="store_true",
                    help="start a new run in an --out folder that holds one: the old run is moved aside to "
                         "OUT.old-<time> (renamed, not deleted)")
    pt.add_argument("--ckpt-every", type=_positive_int("--ckpt-every"), default=100)
    pt.add_argument("--keep", type=_positive_int("--keep"), default=3, help="checkpoints kept")
    pt.add_argument("--max-bad-steps", type=_positive_int("--max-bad-steps"), default=5,
                    help="consecutive non-finite losses before stopping")
    pt.add_argument("--num-workers", type=int, default=None,
                    help="loader processes per rank (default: 1 on CPU; on CUDA up to 8, cores per rank - 1)")
    pt.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pt.add_argument("--compile", action="store_true", help="torch.compile the model")
    pt.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on a CPU with AMX runs ViT-B steps about "
                         "2x as fast as fp32 (tiny: 1.3x); targets always come from the fp32 frontend")
    pt.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP (under torchrun)")
    pt.add_argument("--no-progress", action="store_true")
    pt.set_defaults(func=_pretrain)

    pr = sub.add_parser("prepare", help="decode a folder of audio (or Debian packages' audio) into int16 shards")
    pr.add_argument("paths", nargs="+", metavar="SRC OUT | OUT", help="SRC OUT, or OUT alone with --debian")
    pr.add_argument("--debian", default=None, metavar="PKG[,PKG...]|default",
                    help="fetch these Debian packages (no root) and prepare their audio; 'default' = the 15-package "
                         "set in bestrq2.data.debian_corpus (never a package a built-in eval task uses)")
    pr.add_argument("--cache", default=None, help="package cache (default ~/.cache/bestrq2/eval)")
    pr.add_argument("--workers", type=_positive_int("--workers"), default=None, help="decoding processes (default: all cores)")
    pr.add_argument("--shard-mb", type=_positive_int("--shard-mb"), default=512)
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_prepare)

    ex = sub.add_parser("export", help="write the encoder of a checkpoint (or a run's latest) for from_pretrained")
    ex.add_argument("ckpt", help="a checkpoint file or a run directory")
    ex.add_argument("out")
    ex.add_argument("--onnx", action="store_true", help="also write OUT/encoder.onnx (needs the onnx extra), "
                    "its attention as onnxruntime's Attention contrib op")
    ex.add_argument("--onnx-portable", action="store_true",
                    help="also write OUT/encoder.onnx in standard ONNX ops only (any ONNX runtime)")
    ex.set_defaults(func=_export)

    em = sub.add_parser("embed", help="frame embeddings of audio files (one file, several, or folders)")
    em.add_argument("inputs", nargs="+", metavar="PATH",
                    help="an audio file, or several files / folders (searched recursively) with --out-dir")
    em.add_argument("--model", default="runs/demo/encoder", help="directory written by pretrain/save_pretrained")
    em.add_argument("--out", default=None, help="one input file: save its frames [T', D] as .npy")
    em.add_argument("--out-dir", default=None, help="write OUT_DIR/<file path under its folder>.npy per file "
                    "(files already there are skipped, so a stopped run resumes); failures in embed_errors.tsv")
    em.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8,
                    help="clips of at most 10 s run together (sorted by length); a longer file runs alone")
    em.add_argument("--pool", default="none", choices=["none", "mean"],
                    help="none: frames [T', D]; mean: one clip embedding [D] (their mean over time)")
    em.add_argument("--overwrite", action="store_true", help="with --out-dir: embed files whose .npy exists again")
    em.add_argument("--no-progress", action="store_true", help="no progress bar")
    em.add_argument("--device", default="cpu")
    em.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto: bf16 on CUDA and on CPUs with AMX / AVX512-BF16, else fp32 (frontend always fp32)")
    em.add_argument("--cuda-graphs", default="auto", choices=GRAPH_MODES,
                    help="on CUDA, replay a captured CUDA graph per clip shape (auto: batch <= 8; see bestrq2.cuda_graphs)")
    em.set_defaults(func=_embed)

    ev = sub.add_parser("eval", help="X-ARES-style probe + kNN of a frozen encoder on labelled audio")
    ev.add_argument("--model", default=None, help="encoder directory (save_pretrained / bestrq2 export)")
    ev.add_argument("--prepare", action="store_true", help="fetch and build the built-in tasks (cached), then "
                    "evaluate them if --model is given")
    ev.add_argument("--builtin", action="store_true", help="evaluate the built-in tasks (built if missing)")
    ev.add_argument("--tasks", default=None, help="comma list of built-in tasks (default: all)")
    ev.add_argument("--cache", default=None, help="cache folder (default ~/.cache/bestrq2/eval)")
    ev.add_argument("--limit", type=_positive_int("--limit"), default=None, help="files per class (smoke runs)")
    ev.add_argument("--manifest", action="append", default=[],
                    help="CSV of path,label and split (train/val|valid|validation|dev/test) or group; repeatable; "
                         "other columns are ignored")
    ev.add_argument("--domain", action="append", default=[],
                    help="domain of the manifests: once for all, or once per --manifest in order (default: the "
                         "manifest's domain column, else task.json beside it, else 'custom')")
    ev.add_argument("--baseline", default=None, help="a second encoder directory: paired differences model - baseline")
    ev.add_argument("--probe", default="logistic", choices=["logistic", "xares"],
                    help="logistic: standardised features, L2 logistic regression to convergence (deterministic); "
                         "xares: X-ARES's MLP probe with early stopping on val")
    ev.add_argument("--cv", type=_cv_arg, default=None, metavar="K|groups",
                    help="K-fold cross-validation over groups (or leave one group out) instead of the split")
    ev.add_argument("--seeds", type=_positive_int("--seeds"), default=1, help="xares probe: seeds (mean +- std)")
    ev.add_argument("--epochs", type=_positive_int("--epochs"), default=1000, help="xares probe: most epochs")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default=None, help="write the markdown report (and a .json beside it)")
    ev.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="encoder precision (see embed --precision); the log-mel floor is always fp32")
    ev.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8,
                    help="clips each encoder runs at a time for the features (same features up to float32 rounding)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)

    co = sub.add_parser("codes", help="code usage of the quantizer on audio files, folders or a prepared corpus")
    co.add_argument("paths", nargs="+", help="audio files, folders of them, or one prepared corpus")
    co.add_argument("--run", default=None, help="take the quantizer of this run (its latest checkpoint)")
    co.add_argument("--seed", type=int, default=0, help="quantizer seed without --run")
    co.add_argument("--rpq-norm", default="none", choices=["none", "patch", "bin"], help="without --run")
    co.add_argument("--seconds", type=float, default=10.0, help="read at most this much of each file")
    co.add_argument("--max-clips", type=_positive_int("--max-clips"), default=256)
    co.add_argument("--plot", default=None, help="write a histogram of the sorted code shares (png)")
    co.add_argument("--json", default=None, help="write the figures as JSON")
    co.set_defaults(func=_codes)

    sy = sub.add_parser("synth", help="write one clip of the procedural corpus as a wav")
    sy.add_argument("out")
    sy.add_argument("--seconds", type=float, default=10.0)
    sy.add_argument("--seed", type=int, default=12345)
    sy.add_argument("--index", type=int, default=0)
    sy.set_defaults(func=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"bestrq2 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
