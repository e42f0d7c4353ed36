"""bestrq2: fast, faithful BEST-RQ-2 (contextualize-then-predict) audio pretraining.

Public API: ``BestRQ2Config``, ``BestRQ2`` (pretraining module), ``BestRQ2Encoder`` (inference).
"""
from .config import BestRQ2Config
from .encoder import BestRQ2Encoder
from .model import BestRQ2, PretrainOutput

__version__ = "0.1.0"
__all__ = ["BestRQ2Config", "BestRQ2", "BestRQ2Encoder", "PretrainOutput", "__version__"]
