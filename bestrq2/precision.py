"""Which dtype the encoder's matmuls run in: ``fp32``, ``bf16`` (autocast), or ``auto``.

``auto`` takes bf16 where the hardware runs it fast: on CUDA, and on CPUs with AMX or AVX512-BF16
(read from ``torch.cpu.get_capabilities()``); float32 elsewhere (bf16 emulated on a CPU without those
units is slower than float32). The log-mel frontend, the quantizer and the position tables always
stay float32; only the patch embedding and the transformer run in bf16.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

PRECISIONS = ("auto", "fp32", "bf16")
log = logging.getLogger(__name__)
_said: set[tuple[str, str]] = set()


def cpu_bf16_units() -> str | None:
    """"AMX" or "AVX512-BF16" when this CPU has them, else None."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        caps = {}
    if caps.get("amx_bf16"):
        return "AMX"
    if caps.get("avx512_bf16") or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for float32, a sentence saying why)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None, "fp32 (asked)"
    if device.type == "cuda":
        return torch.bfloat16, f"bf16 ({'asked' if precision == 'bf16' else 'auto: CUDA'})"
    units = cpu_bf16_units()
    if precision == "bf16":
        return torch.bfloat16, "bf16 (asked" + ("" if units else "; this CPU has no AMX or AVX512-BF16: slow") + ")"
    if device.type == "cpu" and units:
        return torch.bfloat16, f"bf16 (auto: this CPU has {units})"
    return None, "fp32 (auto: no bf16 units on this device)"


def announce(precision: str, device: torch.device, what: str = "encoder") -> torch.dtype | None:
    """``resolve``, logging the choice once per (precision, device type)."""
    dtype, why = resolve(precision, device)
    key = (precision, device.type)
    if key not in _said:
        _said.add(key)
        log.info("bestrq2 %s precision: %s", what, why)
    return dtype


def weights_key(module: torch.nn.Module) -> tuple:
    """Identity, storage and version of every parameter and buffer: changes whenever any weight does
    (``load_state_dict`` and optimizer steps bump the version, ``.to()`` moves the storage). What the cached
    bf16 copies (``CastWeights``) and captured CUDA graphs (``bestrq2.cuda_graphs``) are keyed by."""
    return tuple((id(t), t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


def packed_linear_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN's prepacked linear (``torch.ops.mkldnn``, the ops inductor's CPU freezing uses)
    is in this torch build and runs a ``dtype`` (bf16 or float32) matmul here."""
    if dtype not in _PACKED_OK:
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 16, dtype=dtype), 4)
            y = torch.ops.mkldnn._linear_pointwise(torch.ones(3, 16, dtype=dtype), w,
                                                   torch.zeros(8, dtype=dtype), "none", [], "")
            _PACKED_OK[dtype] = bool(torch.backends.mkldnn.is_available()) and tuple(y.shape) == (3, 8) and \
                bool((y == 16).all())
        except (AttributeError, RuntimeError, NotImplementedError):
            _PACKED_OK[dtype] = False
    return _PACKED_OK[dtype]


_PACKED_OK: dict[torch.dtype, bool] = {}


class _PackedLinearMode(TorchFunctionMode):
    """Routes ``F.linear`` calls whose weight is in ``packed`` ({id(weight): (packed weight, bias in its
    dtype)}) to oneDNN's prepacked linear; every other call runs as usual."""

    def __init__(self, packed: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        super().__init__()
        self.packed = packed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and id(args[1]) in self.packed:
            w, b = self.packed[id(args[1])]
            x = args[0]
            # a call without a bias (one left to a fused op after it, as the Triton path's blocks do) gets none
            if (args[2] if len(args) > 2 else kwargs.get("bias")) is None:
                b = None
            return torch.ops.mkldnn._linear_pointwise(x.to(w.dtype).contiguous(), w, b, "none", [], "")
        return func(*args, **kwargs)


class CastWeights:
    """Inference copies of a module's ``nn.Linear`` weights, made once and reused: bf16 copies, and on a
    CPU the weights prepacked for oneDNN (bf16 or float32).

    Under autocast every linear casts its float32 weight to bf16 on every call: for ViT-B at batch 1 on a
    CPU that is 86 M parameters read and written per forward (38% of the bf16 time). ``run`` instead
    uses copies made once, remade only when a weight changes (``load_state_dict``, an optimizer step,
    ``.to()``: keyed by ``weights_key``):

    - on a CPU with oneDNN (``packed_linear_available``) and ``pack``: the weights (bf16, or float32 as
      they are) prepacked into oneDNN's blocked layout and run through its prepacked linear. bf16: on a
      2-core Xeon with AMX the ViT-B forward's linears took 230 ms instead of 420 at batch 8; biases in
      bf16, as autocast gives them. float32: on a 2-core AMD EPYC (no AMX) the ViT-B forward ran 1.25-1.3x
      faster than through ``F.linear`` (MKL); on the AMX Xeon it was even. Same products, oneDNN's
      summation order. Costs a packed copy of every linear weight (2 bytes a weight in bf16, 4 in float32).
    - elsewhere (CUDA, or ``pack=False``): the bf16 weights handed to ``torch.func.functional_call``;
      bit-identical to autocast's own per-call cast.

    Inference only: callers use it with gradients off."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # the copies are derived data, and oneDNN's packed tensors cannot be copied or pickled: a copied
    # encoder (copy.deepcopy, pickle) starts with an empty cache and remakes it on its first call
    def __deepcopy__(self, memo) -> "CastWeights":
        return CastWeights()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @staticmethod
    def _linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}

    def _refresh(self, module: torch.nn.Module, dtype: torch.dtype, pack: bool) -> None:
        key = (dtype, pack, weights_key(module))
        if key == self._key:
            return
        linears = self._linears(module)
        # normal tensors even when first called inside torch.inference_mode
        with torch.inference_mode(False), torch.no_grad():
            self._weights = {f"{n}.weight" if n else "weight": m.weight.detach().to(dtype)
                             for n, m in linears.items()}
            self._packed = {}
            if pack:
                for n, m in linears.items():
                    w = self._weights[f"{n}.weight" if n else "weight"]
                    b = None if m.bias is None else m.bias.detach().to(dtype)
                    # the layout is chosen for 1,024 rows (8 clips of 128 tokens); it runs any row count
                    self._packed[id(m.weight)] = (torch.ops.mkldnn._reorder_linear_weight(w, 1024), b)
                self._weights = {}
        self._key = key

    def get(self, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{parameter name: ``dtype`` copy} for every linear weight of ``module``."""
        self._refresh(module, dtype, pack=False)
        return self._weights

    def run(self, module: torch.nn.Module, dtype: torch.dtype, *args, pack: bool = True):
        """``module(*args)`` under the caller's autocast, its linears on the cached ``dtype`` weights
        (prepacked on a CPU when ``pack`` and oneDNN runs that dtype)."""
        device = next(module.parameters()).device
        if pack and device.type == "cpu" and packed_linear_available(dtype):
            self._refresh(module, dtype, pack=True)
            with _PackedLinearMode(self._packed):
                return module(*args)
        return torch.func.functional_call(module, self.get(module, dtype), args)

    def clear(self) -> None:
        self._key, self._weights, self._packed = None, {}, {}
