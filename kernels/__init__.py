"""Fast paths of bestrq2, importable as ``bestrq2.kernels`` (this folder is installed under the
``bestrq2`` namespace; nothing installs a top-level ``kernels``).

Each op lives in its own file next to its plain-PyTorch reference ``<op>_ref``, in one style: Triton
kernels -> launchers registered with ``torch.library`` (``bestrq2::*``, so torch.compile traces through
them; ``_op.FastOp`` runs plain eager calls without the dispatcher) -> ``register_autograd`` -> a checked
functional wrapper. Each wrapper takes ``impl`` (auto | triton | reference; auto runs Triton on CUDA
tensors); the model passes the one its config names (``BestRQ2Config.kernels``), a direct call without it
reads ``BESTRQ2_KERNELS``. Shared checks and launch helpers are in ``_dispatch``.
"""
from ._dispatch import backend
from .add_layer_norm import add_layer_norm, add_layer_norm_ref
from .bias_gelu import bias_gelu, bias_gelu_ref
from .gather_tokens import gather_tokens, gather_tokens_ref
from .layer_norm import layer_norm, layer_norm_ref
from .linear_cross_entropy import choose_chunk, linear_cross_entropy, linear_cross_entropy_ref
from .residual_drop_path import residual_drop_path, residual_drop_path_ref
from .rpq_codes import rpq_codes, rpq_codes_ref, rpq_scores_ref, spec_patches
from .scatter_tokens import scatter_tokens, scatter_tokens_ref

__all__ = ["add_layer_norm", "add_layer_norm_ref", "backend", "bias_gelu", "bias_gelu_ref", "choose_chunk", "gather_tokens", "gather_tokens_ref",
           "layer_norm", "layer_norm_ref", "linear_cross_entropy", "linear_cross_entropy_ref",
           "residual_drop_path", "residual_drop_path_ref", "rpq_codes", "rpq_codes_ref", "rpq_scores_ref",
           "scatter_tokens", "scatter_tokens_ref", "spec_patches"]
