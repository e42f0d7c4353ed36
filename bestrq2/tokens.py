"""From waveforms to patch grids, exactly per clip even inside padded batches.

A clip of T samples gives W = floor((1 + T // 625) / 16) time patches and N = 8 W tokens. A padded
batch is laid out on an 8 x W_max grid (token f * W_max + t); the clip's padding columns are flagged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HOP, N_FFT, N_MELS, PATCH
from .frontend import LogMel, num_time_patches, patchify, truncate_to_patches
from .positions import positions_for


@dataclass
class PatchGrid:
    raw: torch.Tensor  # [B, 8 * W_max, 256] raw log-mel patches (zeros in padding columns)
    widths: torch.Tensor  # int64 [B]: time patches of each clip (W_b)
    width: int  # W_max
    key_padding: torch.Tensor | None  # bool [B, N], True = padding column; None when no clip is padded
    target_padding: torch.Tensor | None = None  # bool [B, N]: patch lies wholly in padding (loss mask)
    spec: torch.Tensor | None = None  # [B, 128, 16 W] the log-mel the patches come from (pretraining path)

    @property
    def num_tokens(self) -> int:
        return self.raw.shape[1]

    def token_index(self) -> torch.Tensor:
        """Index of each grid slot in its own clip's 8 x W_b grid: f * W_b + t, int64 [B, N]."""
        n = torch.arange(self.num_tokens, device=self.raw.device)
        f, t = n // self.width, n % self.width
        return f[None] * self.widths.to(self.raw.device)[:, None] + t[None]

    def positions(self, dim: int, layout: str) -> torch.Tensor:
        """Sincos rows for every slot, [B, N, dim] (grid layout, or the authors' flat-index rows)."""
        if self.key_padding is None:  # every clip is W_max wide: one table for all, built on the device
            # from Python ints (no host copy or host read: safe inside a CUDA-graph capture)
            n = torch.arange(self.num_tokens, device=self.raw.device)
            return positions_for(n, self.width, dim, layout).expand(self.raw.shape[0], -1, -1)
        w = self.widths.to(self.raw.device)[:, None]
        return positions_for(self.token_index(), w, dim, layout).to(self.raw.device)


def wave_to_grid(frontend: LogMel, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> PatchGrid:
    """wave [B, T] (checked) -> PatchGrid, each clip exactly as if alone (the inference encoder).

    With ``lengths`` each clip's spectrogram is computed at its own length, so its reflect-padded
    last frames equal running it alone, and the padding columns are flagged. (Pretraining analyses a
    padded batch as one signal instead, as the paper's code does: see ``target_padding``.)
    """
    b, t = wave.shape
    if lengths is None or bool((lengths == t).all()):
        spec = truncate_to_patches(frontend(wave))
        w = spec.shape[-1] // PATCH
        widths = torch.full((b,), w, dtype=torch.int64)
        return PatchGrid(patchify(spec), widths, w, None, None, spec)
    widths = torch.tensor([num_time_patches(int(n)) for n in lengths], dtype=torch.int64)
    w_max = num_time_patches(t)
    fp = frontend.fb.shape[1] // PATCH
    spec = torch.zeros(b, frontend.fb.shape[1], w_max * PATCH, device=wave.device, dtype=frontend.fb.dtype)
    for n in torch.unique(lengths).tolist():  # one STFT call per distinct length
        rows = (lengths == n).nonzero().flatten().to(wave.device)
        s = truncate_to_patches(frontend(wave[rows, :n]))
        spec[rows, :, : s.shape[-1]] = s
    raw = patchify(spec)
    pad_cols = torch.arange(w_max)[None, :] >= widths[:, None]  # [B, W_max]
    raw = raw.masked_fill(pad_cols.repeat(1, fp).to(wave.device)[..., None], 0.0)
    key_padding = pad_cols.repeat(1, fp).to(wave.device)  # [B, 8 * W_max], f-major like the tokens
    key_padding = key_padding if bool(key_padding.any()) else None
    return PatchGrid(raw, widths, w_max, key_padding, key_padding)


def target_padding(lengths: torch.Tensor | None, num_samples: int) -> torch.Tensor | None:
    """Host side, for a padded batch analysed as one signal (pretraining): bool [B, 8 * W] (CPU),
    True where a patch lies wholly in padding; None when none does. A column lies wholly in padding
    when even its first frame's window (centre 16 t * 625, half-width n_fft / 2) starts at or after
    the clip's end."""
    if lengths is None:
        return None
    w = num_time_patches(num_samples)
    first_sample = torch.arange(w)[None, :] * PATCH * HOP - N_FFT // 2
    pad_cols = (first_sample >= lengths.cpu()[:, None]).repeat(1, N_MELS // PATCH)
    return pad_cols if bool(pad_cols.any()) else None


__all__ = ["PatchGrid", "target_padding", "wave_to_grid"]
