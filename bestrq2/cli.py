"""Command line: ``bestrq2 pretrain``, ``bestrq2 embed``, ``bestrq2 synth``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from .train import TrainConfig, pretrain

    tc = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, seed=args.seed, out=args.out, data=args.data,
                     seconds=args.seconds, ckpt_every=args.ckpt_every, num_workers=args.num_workers,
                     device=args.device, grad_clip=args.grad_clip, progress=not args.no_progress)
    res = pretrain(tc, resume=args.resume)
    losses = res["losses"]
    if losses:
        k = max(1, len(losses) // 10)
        print(f"loss: first {k} steps {sum(losses[:k]) / k:.3f} -> last {k} steps {sum(losses[-k:]) / k:.3f}")
    print(f"encoder written to {Path(res['out']) / 'encoder'}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .data.folder import load_audio
    from .encoder import BestRQ2Encoder

    enc = BestRQ2Encoder.from_pretrained(args.model, map_location=args.device)
    wave = torch.from_numpy(load_audio(args.file))[None]
    frames = enc(wave)[0].cpu().numpy()
    print(f"{args.file}: {wave.shape[1] / 16000:.2f} s -> {frames.shape[0]} frames x {frames.shape[1]} dims "
          f"(one per {enc.hop_size_in_ms:g} ms)")
    mean = frames.mean(0)
    print("clip embedding (mean over frames), first 8 dims:", np.array2string(mean[:8], precision=4))
    if args.out:
        np.save(args.out, frames)
        print(f"frames saved to {args.out}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    import soundfile as sf

    from .data.synthetic import synth_clip

    sf.write(args.out, synth_clip(args.seed, args.index, args.seconds), 16000)
    print(f"wrote {args.out} ({args.seconds:g} s of the procedural corpus, clip {args.index})")
    return 0


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bestrq2", description="BEST-RQ-2 audio pretraining and embedding")
    sub = p.add_subparsers(dest="command", required=True)

    pt = sub.add_parser("pretrain", help="pretrain a model (default: tiny model on the procedural corpus)")
    pt.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    pt.add_argument("--data", default=None, help="folder of audio files (wav/flac/ogg/mp3); default: procedural corpus")
    pt.add_argument("--steps", type=_positive_int("--steps"), default=300)
    pt.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8)
    pt.add_argument("--lr", type=float, default=1e-4)
    pt.add_argument("--weight-decay", type=float, default=0.05)
    pt.add_argument("--grad-clip", type=float, default=0.0)
    pt.add_argument("--seconds", type=float, default=10.0, help="clip length")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out", default="runs/demo")
    pt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    pt.add_argument("--ckpt-every", type=_positive_int("--ckpt-every"), default=100)
    pt.add_argument("--num-workers", type=int, default=1)
    pt.add_argument("--device", default="auto")
    pt.add_argument("--no-progress", action="store_true")
    pt.set_defaults(func=_pretrain)

    em = sub.add_parser("embed", help="frame embeddings of an audio file")
    em.add_argument("file")
    em.add_argument("--model", default="runs/demo/encoder", help="directory written by pretrain/save_pretrained")
    em.add_argument("--out", default=None, help="save frames [T', D] as .npy")
    em.add_argument("--device", default="cpu")
    em.set_defaults(func=_embed)

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
    except (ValueError, FileNotFoundError) as err:
        print(f"bestrq2 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
