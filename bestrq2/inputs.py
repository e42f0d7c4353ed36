"""Checks on audio handed to the models: clear ``ValueError``s instead of crashes deep inside."""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import MIN_SAMPLES, SAMPLE_RATE



def check_wave(wave, lengths=None, sample_rate: int | None = None,
               pcm16: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a waveform batch.

    wave: float tensor [B, T] (or [B, 1, T], the authors' layout) of samples in [-1, 1] at 16 kHz.
    lengths: optional int [B], the true sample count of each clip (the rest is padding).
    pcm16: also take int16 PCM (full scale 32768; every value is valid audio) and return it as it is: the
    training loader's batches from prepared shards, scaled on the device (``pcm16_to_float``).
    Returns (wave [B, T] float32 (float64 stays float64; int16 with ``pcm16``), lengths int64 [B] or None).
    """
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(wave)
    if not isinstance(wave, torch.Tensor):
        raise ValueError(f"wave must be a torch.Tensor or numpy array, got {type(wave).__name__}")
    if sample_rate is not None and int(sample_rate) != SAMPLE_RATE:
        raise ValueError(f"audio is at {sample_rate} Hz; bestrq2 models take {SAMPLE_RATE} Hz mono. "
                         "Resample first (for example scipy.signal.resample_poly).")
    if wave.dtype == torch.bool:
        raise ValueError("wave has dtype torch.bool: a mask, not audio. Pass float samples in [-1, 1]")
    if wave.is_complex():
        raise ValueError(f"wave has dtype {wave.dtype}: complex values are not audio samples. Pass the real "
                         "float signal in [-1, 1] (a spectrum must be turned back into a waveform first)")
    if not wave.is_floating_point() and not (pcm16 and wave.dtype == torch.int16):
        raise ValueError(f"wave has dtype {wave.dtype}: integer PCM is not accepted. Convert to float "
                         "in [-1, 1] first (int16: divide by 32768; int32: by 2147483648; uint8: "
                         "subtract 128, divide by 128).")
    if wave.dim() == 3:
        if wave.shape[1] != 1:
            raise ValueError(f"wave [B, C, T] must be mono (C = 1), got {wave.shape[1]} channels; mix down first")
        wave = wave[:, 0]
    if wave.dim() != 2:
        raise ValueError(f"wave must be [B, T] (or [B, 1, T]), got shape {list(wave.shape)}")
    b, t = wave.shape
    if b == 0 or t == 0:
        raise ValueError(f"wave is empty (shape {list(wave.shape)})")
    if wave.dtype == torch.int16:  # pcm16: finite and within [-1, 1) by construction, nothing to read
        return wave, _check_lengths(lengths, b, t)
    wave = wave if wave.dtype == torch.float64 else wave.float()  # float64 stays: exact-arithmetic runs
    # one pass without temporaries (the training loop checks 256 x 10 s a step on the host: isfinite + abs
    # + max took 0.49 s of one core there, aminmax 0.02 s); NaN propagates through it and inf is a bound,
    # so the per-clip search runs only when something is wrong
    lo, hi = (float(v) for v in torch.aminmax(wave))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = (~torch.isfinite(wave)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"wave holds NaN or inf samples (clips {bad})")
    peak = max(-lo, hi)
    if peak > 2.0:
        raise ValueError(f"wave peaks at {peak:.1f}: samples must lie in [-1, 1]; this looks like "
                         "unscaled integer PCM (int16: divide by 32768)")
    return wave, _check_lengths(lengths, b, t)


def _check_lengths(lengths, b: int, t: int) -> torch.Tensor | None:
    if lengths is None:
        if t < MIN_SAMPLES:
            raise ValueError(f"audio of {t} samples is shorter than one patch ({MIN_SAMPLES} samples, "
                             f"{MIN_SAMPLES / SAMPLE_RATE:.3f} s at {SAMPLE_RATE} Hz)")
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.dim() != 1 or lengths.shape[0] != b:
        raise ValueError(f"lengths must be an integer tensor of shape [{b}], got {lengths.dtype} {list(lengths.shape)}")
    lengths = lengths.to(torch.int64).cpu()
    if bool((lengths > t).any()):
        raise ValueError(f"lengths {lengths.tolist()} exceed the padded length {t}")
    if bool((lengths < MIN_SAMPLES).any()):
        short = (lengths < MIN_SAMPLES).nonzero().flatten().tolist()
        raise ValueError(f"clips {short} are shorter than one patch ({MIN_SAMPLES} samples)")
    return lengths


PCM16_SCALE = 1.0 / 32768  # a power of two: int16 -> float32 times it is exact, as numpy's `/ 32768.0`


def pcm16_to_float(wave: torch.Tensor) -> torch.Tensor:
    """int16 PCM -> float32 in [-1, 1) (float waves pass through): where the wave lies, so a training batch
    crosses to the GPU in half the bytes and the host never converts it."""
    return wave.float().mul_(PCM16_SCALE) if wave.dtype == torch.int16 else wave


_COPY_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def copy_to_device(tensors: list[torch.Tensor | None], device: torch.device | str) -> list[torch.Tensor | None]:
    """Host tensors (None passes) -> ``device``, for a step's inputs.

    On CUDA the copies go on a side stream: a copy queued on the compute stream would wait for every
    kernel already queued there (the host runs a step ahead) and the next step's kernels for it, so the
    card would stand still for it, and a 256 x 10 s float32 batch is 164 MB, about 3 ms of PCIe. On the
    side stream the copy overlaps the kernels queued before it. The compute stream then waits for the
    copies before anything queued after this call, and each copy is marked as used there
    (``record_stream``), so the allocator does not hand its memory out while the compute stream may still
    read it. Sources are pinned first where they are not (the loader's batches already are). Nothing
    here waits on the host. Elsewhere: plain ``Tensor.to`` (the tensor itself where it already lies)."""
    device = torch.device(device)
    if device.type != "cuda":
        return [None if t is None else t.to(device) for t in tensors]
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    compute = torch.cuda.current_stream(device)
    side = _COPY_STREAMS.get(device.index)
    if side is None:
        side = _COPY_STREAMS[device.index] = torch.cuda.Stream(device)
    copied = [t is not None and t.device != device for t in tensors]
    with torch.cuda.stream(side):
        out = [(t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t).to(device, non_blocking=True)
               if c else t for t, c in zip(tensors, copied)]
    compute.wait_stream(side)
    for t, c in zip(out, copied):
        if c:
            t.record_stream(compute)
    return out
