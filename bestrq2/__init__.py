"""bestrq2: fast, faithful BEST-RQ-2 (contextualize-then-predict) audio pretraining.

Public API: ``BestRQ2Config``, ``BestRQ2`` (pretraining module), ``BestRQ2Encoder`` (inference).
"""
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _attach_kernels() -> None:
    """setup.py maps the top-level ``kernels/`` folder to ``bestrq2.kernels``. From a source checkout
    that was not pip-installed (or whose editable install is shadowed by the checkout's own
    ``bestrq2/`` on sys.path, as on the GPU machine), load it from beside this package instead."""
    if _util.find_spec(__name__ + ".kernels") is not None:
        return
    here = _Path(__file__).resolve().parent.parent / "kernels"
    spec = _util.spec_from_file_location(__name__ + ".kernels", here / "__init__.py",
                                         submodule_search_locations=[str(here)])
    if spec is None:
        raise ImportError(f"bestrq2.kernels not installed and {here} not found")
    mod = _util.module_from_spec(spec)
    _sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)


_attach_kernels()

from .config import BestRQ2Config  # noqa: E402
from .encoder import BestRQ2Encoder  # noqa: E402
from .model import BestRQ2, PretrainOutput  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BestRQ2Config", "BestRQ2", "BestRQ2Encoder", "PretrainOutput", "__version__"]
