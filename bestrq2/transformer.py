"""Pre-norm ViT blocks (timm layout and key names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2).

Shapes: x [B, L, D]; ``key_padding`` bool [B, L], True = padding (never attended). With a varlen
attention backend and padding present, the blocks run on the valid tokens only, packed end to end
(LayerNorm and MLP are per token), and the result is scattered back: no compute on padding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import VARLEN, dense_attention, resolve, triton_qkv_attention, varlen_attention
from .kept import kept
from .kernels import add_layer_norm, bias_gelu, layer_norm, residual_drop_path
from .kernels._dispatch import use_triton


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p (train only).

    ``add(x, branch)`` is the residual add with the drop folded in, x + branch * (noise / keep), in one
    pass (``kernels.residual_drop_path``), where ``x + drop(branch)`` would write the scaled branch first."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    @property
    def active(self) -> bool:
        return self.p > 0.0 and self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return x * self.factors(x.shape[0], x.device).view((-1,) + (1,) * (x.dim() - 1))

    def factors(self, n: int, device: torch.device) -> torch.Tensor:
        """float32 [n]: 0 for a dropped sample, 1 / keep for a kept one."""
        keep = 1.0 - self.p
        return torch.empty(n, device=device).bernoulli_(keep).div_(keep)

    def row_factors(self, x: torch.Tensor, sample_of: torch.Tensor | None = None,
                    clips: int | None = None, per_clip: bool = False,
                    drawn: torch.Tensor | None = None) -> torch.Tensor | None:
        """float32 [tokens of x]: each token's clip factor (x [B, L, D], or packed [T, D] with ``sample_of[t]``
        = clip of token t of ``clips``: drop per clip, not per token); None when inactive. Without ``clips`` the
        count is read from ``sample_of`` (a device read: the blocks pass it, from the packed batch's shape).
        ``per_clip``: for x [B, L, D], the [B] factors themselves (``add_layer_norm`` takes a factor per block
        of rows: no repeat, an op and a launch fewer per add). ``drawn``: the clips' factors, already drawn
        (``Transformer`` draws every add's at once), else drawn here."""
        if not self.active:
            return None
        if sample_of is None:
            f = drawn if drawn is not None else self.factors(x.shape[0], x.device)
            return f if per_clip else f.repeat_interleave(x[0].numel() // x.shape[-1])
        if drawn is None:
            drawn = self.factors(clips if clips is not None else int(sample_of.max()) + 1, x.device)
        return drawn[sample_of]

    def add(self, x: torch.Tensor, branch: torch.Tensor, sample_of: torch.Tensor | None = None,
            impl: str = "auto", clips: int | None = None, drawn: torch.Tensor | None = None) -> torch.Tensor:
        """x + drop(branch)."""
        rows = self.row_factors(x, sample_of, clips, drawn=drawn)
        if rows is None:
            return x + branch
        d = x.shape[-1]
        return residual_drop_path(x.reshape(-1, d), branch.reshape(-1, d), rows, impl=impl).view(x.shape)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None, backend: str = "sdpa",
                packed: tuple[torch.Tensor, int] | None = None, proj_bias: bool = True) -> torch.Tensor:
        """x [B, L, D], or [T, D] packed when ``packed = (cu_seqlens, max_seqlen)``. ``proj_bias=False``
        leaves the output projection's bias to the caller (the fused residual add takes it)."""
        d = x.shape[-1]
        if backend == "triton":
            # the linear without its bias: the kernels add it to q, k, v as they load them, and their backward
            # writes qkv's gradient as one tensor and sums the bias gradient from its float32 tiles (no stack of
            # three gradients, no separate bias-gradient pass over it: ~4.9 GB a ViT-B step at 256 clips)
            qkv = F.linear(x, self.qkv.weight).unflatten(-1, (3, self.heads, d // self.heads))
            out = triton_qkv_attention(qkv, self.qkv.bias, key_padding, packed)
        else:
            qkv = self.qkv(x).unflatten(-1, (3, self.heads, d // self.heads))
            # unbind, not three selects: its backward stacks the three grads into one tensor, where selects
            # would each write a zero tensor of qkv's size and add them up
            q, k, v = qkv.unbind(-3)
            if packed is not None:
                out = varlen_attention(q, k, v, packed[0], packed[1], backend)
            else:
                out = dense_attention(q, k, v, backend, key_padding)
        out = out.flatten(-2)
        return self.proj(out) if proj_bias else F.linear(out, self.proj.weight)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, impl: str = "auto", fc2_bias: bool = True) -> torch.Tensor:
        """``fc2_bias=False`` leaves fc2's bias to the caller (the fused residual add takes it)."""
        if use_triton(x, self.fc1.bias, impl=impl):
            # fc1 without its bias, then bias + exact (erf) GELU in one kernel: one pass over the
            # [rows, 4 D] activation instead of three (the same function as the authors' timm Mlp)
            h = bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, impl=impl)
        else:
            # elsewhere the timm Mlp itself: the GEMM adds the bias in its epilogue and GELU runs in the
            # matmul's dtype (on a CPU under bf16 autocast, a separate float32 bias + GELU cost 4 passes)
            h = F.gelu(self.fc1(x))
        return self.fc2(h) if fc2_bias else F.linear(h, self.fc2.weight)


class Block(nn.Module):
    """Pre-norm block. ``impl`` (auto | triton | reference) picks the LayerNorm, bias + GELU and
    drop-path + residual implementations: LayerNorm statistics in float32 with the output already in
    the matmul's dtype, bias + GELU in one pass, each residual add with its drop-path scale in one pass."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 impl: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.impl = impl

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None, backend: str = "sdpa",
                packed: tuple[torch.Tensor, int] | None = None, sample_of: torch.Tensor | None = None,
                normed: torch.Tensor | None = None, next_norm: nn.LayerNorm | None = None,
                out_dtype: torch.dtype | None = None, drawn: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x -> x after the block. Fused form (``Transformer`` on the Triton path): given ``normed`` =
        norm1(x) and the LayerNorm that comes after this block (the next block's norm1, or the stack's
        final norm), returns (x after the block, next_norm of it in ``out_dtype``), each residual add
        fused with the LayerNorm after it (``kernels.add_layer_norm``): the same function. There the attention
        and MLP output projections run without their biases, which the fused adds take in float32 (their
        gradients come out of its backward: no separate pass over each projection's output gradient).
        ``drawn``: the two adds' drop-path factors per clip, drawn by the stack (else each add draws its own)."""
        impl, dp = self.impl, self.drop_path
        # packed: the clip count from cu_seqlens' shape (B + 1), not from sample_of's values (a device read per add)
        clips = None if packed is None else packed[0].shape[0] - 1
        f_attn, f_mlp = drawn if drawn is not None else (None, None)
        if normed is None:
            h = self.attn(self._norm(self.norm1, x), key_padding, backend, packed)
            x = dp.add(x, h, sample_of, impl, clips, f_attn)
            return dp.add(x, self.mlp(self._norm(self.norm2, x), impl), sample_of, impl, clips, f_mlp)
        # without ``drawn``, drop-path factors drawn per add, each after its branch, as the unfused form draws them
        h = self.attn(normed, key_padding, backend, packed, proj_bias=False)
        x, y = self._add_norm(x, h, dp.row_factors(x, sample_of, clips, per_clip=True, drawn=f_attn), self.norm2,
                              None, self.attn.proj.bias)
        m = self.mlp(y, impl, fc2_bias=False)
        return self._add_norm(x, m, dp.row_factors(x, sample_of, clips, per_clip=True, drawn=f_mlp), next_norm,
                              out_dtype, self.mlp.fc2.bias)

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, norm.weight, norm.bias, norm.eps, impl=self.impl)

    def _add_norm(self, x, branch, rows, norm: nn.LayerNorm, out_dtype, branch_bias):
        return add_layer_norm(x, branch, rows, norm.weight, norm.bias, norm.eps, out_dtype, impl=self.impl,
                              branch_bias=branch_bias)


class Transformer(nn.Module):
    """``depth`` blocks and a final LayerNorm; drop path rises linearly from 0 to ``drop_path``."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 attention: str = "auto", block: str = "auto") -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 0 else []
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r, block) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.heads = heads
        self.attention = attention  # requested backend; see bestrq2.attention
        self.attention_backend: str | None = None  # the one that ran last
        # on the Triton path, each residual add runs fused with the LayerNorm after it, the block's last
        # with the next block's norm1 (``Block.forward``'s fused form); off where blocks must stay
        # self-contained (FSDP shards each block: the next block's norm weights are not gathered yet)
        self.fuse_blocks = True
        self.apply(_init_vit)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        backend = resolve(self.attention, x, d // self.heads, n)
        self.attention_backend = backend
        if key_padding is not None and backend in VARLEN and bool(key_padding.any()):
            valid = ~key_padding
            lengths = valid.sum(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            sample_of = torch.repeat_interleave(torch.arange(b, device=x.device), lengths)
            h = self._blocks_and_norm(x[valid], None, backend, (cu, int(lengths.max())), sample_of)
            out = x.new_zeros(b, n, d, dtype=h.dtype)  # [T, D] above: clip 0's valid tokens, then clip 1's, ...
            out[valid] = h
            return out
        return self._blocks_and_norm(x, key_padding, backend)

    def drop_factors(self, clips: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per block, its two adds' drop-path factors for this forward, float32 [clips] each (0, or 1 / keep),
        or None for a block without drop path: every add's drawn at once, one ``bernoulli`` and one division for
        the stack where each add drew its own (2 ops, 2 launches on a GPU, 22 adds a ViT-B forward). The same
        law as per-add draws (each factor its own Bernoulli(keep) / keep), not the same random numbers."""
        rates = tuple(blk.drop_path.p if blk.drop_path.active else 0.0 for blk in self.blocks)
        active = [i for i, r in enumerate(rates) if r > 0.0]
        if not active:
            return [None] * len(rates)
        # [2 per active block, 1] keep probabilities, kept; made by fills (no host-to-device copy, capturable)
        keep = kept(self.__dict__.setdefault("_keep_probs", {}), (rates, device), device,
                    lambda: torch.cat([torch.full((2, 1), 1.0 - rates[i], device=device) for i in active]))
        f = torch.bernoulli(keep.expand(len(keep), clips)).div_(keep)  # [2 per active block, clips]
        out: list = [None] * len(rates)
        for j, i in enumerate(active):
            out[i] = (f[2 * j], f[2 * j + 1])
        return out

    def _blocks_and_norm(self, x, key_padding, backend, packed=None, sample_of=None) -> torch.Tensor:
        blocks = self.blocks
        drawn = self.drop_factors(x.shape[0] if packed is None else packed[0].shape[0] - 1, x.device)
        if not (self.fuse_blocks and len(blocks) and use_triton(x, impl=blocks[0].impl)):
            for blk, f in zip(blocks, drawn):
                x = blk(x, key_padding, backend, packed, sample_of, drawn=f)
            return self.norm(x)
        # fused: norm1 of the first block, then each block hands the next its normed input; the last
        # one's output norm is the stack's (float32 under autocast, as nn.LayerNorm gives)
        y = blocks[0]._norm(blocks[0].norm1, x)
        final = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        for i, blk in enumerate(blocks):
            last = i + 1 == len(blocks)
            x, y = blk(x, key_padding, backend, packed, sample_of, normed=y,
                       next_norm=self.norm if last else blocks[i + 1].norm1, out_dtype=final if last else None,
                       drawn=drawn[i])
        return y


def _init_vit(m: nn.Module) -> None:
    """The authors' ViT init: truncated normal (std 0.02) linears with zero bias, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
