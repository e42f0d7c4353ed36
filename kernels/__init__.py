"""Fast paths of bestrq2, importable as ``bestrq2.kernels`` (this folder is installed under the
``bestrq2`` namespace; nothing installs a top-level ``kernels``).

Each op lives in its own file next to its plain-PyTorch reference ``<op>_ref``.
"""
from .rpq_codes import rpq_codes_ref, rpq_scores_ref


def rpq_codes(patches, projection, codebooks):
    """Codes [M, C] of raw patches [M, 256]. Currently the reference op on every device."""
    return rpq_codes_ref(patches, projection, codebooks)


__all__ = ["rpq_codes", "rpq_codes_ref", "rpq_scores_ref"]
