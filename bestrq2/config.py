"""Model configuration: one dataclass with the paper's defaults and named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

SAMPLE_RATE = 16_000
N_FFT = 2048
HOP = 625  # 39.0625 ms
N_MELS = 128
PATCH = 16
REFERENCE_TIME_PATCHES = 16  # a 10 s clip gives 16 time patches: the 8 x 16 grid
MIN_SAMPLES = (PATCH - 1) * HOP  # 9375 samples (0.586 s): the shortest audio with one 16-frame patch column

MASK_MODES = ("shared", "per_sample")
ATTENTION = ("auto", "flash_attn", "fa4", "sdpa", "math", "triton")  # see bestrq2.attention
# The implementation of each fast op (``BestRQ2Config.kernels``): auto = Triton on CUDA tensors, the
# plain-PyTorch reference beside it elsewhere. "block" is the transformer block's LayerNorm, bias + GELU
# and drop-path + residual; "head" also has "torch" (the chunked head with a PyTorch row step).
KERNEL_CHOICES = ("auto", "triton", "reference")
OPS: dict[str, tuple[str, ...]] = {
    "rpq": KERNEL_CHOICES,
    "gather": KERNEL_CHOICES,
    "scatter": KERNEL_CHOICES,
    "head": ("auto", "triton", "torch", "reference"),
    "block": KERNEL_CHOICES,
    "attention": ATTENTION,
}
POS_LAYOUTS = ("grid", "official")
RPQ_NORMS = ("none", "patch", "bin")


@dataclass
class BestRQ2Config:
    """Every knob of the model. Defaults are the paper's (ViT-B encoder, 4-block predictor).

    Audio/frontend fields are fixed by the paper and exposed for documentation; the code
    asserts they keep the values the frontend implements.
    """

    # frontend (16 kHz, 128 mel bins, hop 625 samples, 16 x 16 patches)
    sample_rate: int = SAMPLE_RATE
    n_mels: int = N_MELS
    patch_size: int = PATCH
    max_seconds: float = 10.0  # inference chunk length (X-ARES adapter) and the 8 x 16 grid
    # context encoder
    encoder_depth: int = 12
    encoder_dim: int = 768
    encoder_heads: int = 12
    encoder_drop_path: float = 0.1  # rises linearly from 0 over the blocks
    mlp_ratio: float = 4.0
    # predictor (dropped after pretraining)
    predictor_depth: int = 4
    predictor_dim: int = 768
    predictor_heads: int = 12
    predictor_drop_path: float = 0.0
    # random-projection quantizer
    codebook_size: int = 8192
    codebook_dim: int = 16
    num_codebooks: int = 1
    rpq_norm: str = "none"  # quantizer input: "none" (the paper), "patch" (each patch standardised), "bin"
    # masking
    mask_ratio_min: float = 0.4
    mask_ratio_max: float = 0.6
    mask_mode: str = "shared"  # "shared" (paper) | "per_sample"
    mask_equal_counts: bool = True  # per_sample only: False draws each clip's own ratio (ragged batches)
    # implementation per op (keys of OPS; a missing key is "auto"): one switch for every fast path.
    # Environment overrides (BESTRQ2_KERNELS, BESTRQ2_ATTENTION) are folded in by ``resolved()`` when a
    # model is built, so the config a run saves names what ran
    kernels: dict[str, str] = field(default_factory=dict)
    # variants
    one_stage: bool = False  # True: the paper's BEST-RQ (ViT) baseline, no predictor
    pos_layout: str = "grid"  # "grid": each (f, t) cell its own sincos row; "official": authors' quirk
    loss_on_padding: bool = False  # True restores the paper's code: fully padded patches are targets too
    seed: int = 0  # seed of the frozen quantizer (and of weight init when built through the CLI)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, saved with the config

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"BestRQ2Config: {msg}")

        need(self.sample_rate == SAMPLE_RATE, f"sample_rate must be {SAMPLE_RATE} (got {self.sample_rate})")
        need(self.n_mels == N_MELS, f"n_mels must be {N_MELS} (got {self.n_mels})")
        need(self.patch_size == PATCH, f"patch_size must be {PATCH} (got {self.patch_size})")
        for name in ("encoder_depth", "encoder_dim", "encoder_heads", "codebook_size",
                     "codebook_dim", "num_codebooks"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        need(self.encoder_dim % self.encoder_heads == 0,
             f"encoder_dim {self.encoder_dim} is not divisible by encoder_heads {self.encoder_heads}")
        need(self.encoder_dim % 4 == 0, f"encoder_dim {self.encoder_dim} must be a multiple of 4 (2D sincos)")
        if not self.one_stage:
            need(self.predictor_depth >= 1, "predictor_depth must be >= 1")
            need(self.predictor_dim % self.predictor_heads == 0,
                 f"predictor_dim {self.predictor_dim} is not divisible by predictor_heads {self.predictor_heads}")
            need(self.predictor_dim % 4 == 0, f"predictor_dim {self.predictor_dim} must be a multiple of 4")
        need(0.0 <= self.mask_ratio_min <= self.mask_ratio_max < 1.0,
             f"need 0 <= mask_ratio_min <= mask_ratio_max < 1 (got {self.mask_ratio_min}, {self.mask_ratio_max})")
        need(self.mask_mode in MASK_MODES, f"mask_mode must be one of {MASK_MODES} (got {self.mask_mode!r})")
        for op, impl in self.kernels.items():
            need(op in OPS, f"kernels: unknown op {op!r}; the ops are {tuple(OPS)}")
            need(impl in OPS[op], f"kernels[{op!r}] must be one of {OPS[op]} (got {impl!r})")
        need(self.mask_equal_counts or self.mask_mode == "per_sample",
             "mask_equal_counts=False needs mask_mode='per_sample' (a shared mask has one count)")
        need(self.rpq_norm in RPQ_NORMS, f"rpq_norm must be one of {RPQ_NORMS} (got {self.rpq_norm!r})")
        need(self.pos_layout in POS_LAYOUTS, f"pos_layout must be one of {POS_LAYOUTS} (got {self.pos_layout!r})")
        need(0.0 <= self.encoder_drop_path < 1.0 and 0.0 <= self.predictor_drop_path < 1.0,
             "drop path rates must lie in [0, 1)")
        need(self.max_seconds * self.sample_rate >= self.min_samples,
             f"max_seconds {self.max_seconds} is shorter than one patch")

    # ------------------------------------------------------------- derived
    @property
    def patch_dim(self) -> int:
        """Values per raw patch (16 x 16 = 256): the quantizer's input size."""
        return self.patch_size * self.patch_size

    @property
    def freq_patches(self) -> int:
        return self.n_mels // self.patch_size  # 8

    @property
    def min_samples(self) -> int:
        """Fewest samples that give one 16-frame patch column: 1 + T // 625 >= 16."""
        return MIN_SAMPLES

    @property
    def chunk_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    def resolved(self) -> "BestRQ2Config":
        """This config with every op named and the environment's overrides applied (``bestrq2.env``):
        ``BESTRQ2_KERNELS`` sets rpq, gather, scatter, head and block; ``BESTRQ2_ATTENTION`` attention."""
        from .env import read

        ops = {op: self.kernels.get(op, "auto") for op in OPS}
        forced = read("BESTRQ2_KERNELS").lower()
        if forced:
            if forced not in KERNEL_CHOICES:
                raise ValueError(f"BESTRQ2_KERNELS must be one of {KERNEL_CHOICES}, got {forced!r}")
            ops.update({op: forced for op in OPS if op != "attention"})
        ops["attention"] = read("BESTRQ2_ATTENTION").lower() or ops["attention"]
        return dataclasses.replace(self, kernels=ops)

    # ------------------------------------------------------------- presets / io
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BestRQ2Config":
        """Named sizes: ``tiny`` (CPU demos and tests), ``small``, ``base`` (the paper)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BestRQ2Config":
        d = dict(d)
        # configs saved before the one ``kernels`` switch: attention and fused_head were fields
        kernels = dict(d.pop("kernels", {}))
        if "attention" in d:
            kernels.setdefault("attention", d.pop("attention"))
        if d.pop("fused_head", True) is False:
            kernels.setdefault("head", "reference")
        d["kernels"] = kernels
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"BestRQ2Config: unknown fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(encoder_depth=4, encoder_dim=192, encoder_heads=3,
                 predictor_depth=2, predictor_dim=192, predictor_heads=3),
    "small": dict(encoder_depth=12, encoder_dim=384, encoder_heads=6,
                  predictor_depth=4, predictor_dim=384, predictor_heads=6),
    "base": dict(),  # the paper: 12 x 768 encoder, 4 x 768 predictor, 12 heads
}
