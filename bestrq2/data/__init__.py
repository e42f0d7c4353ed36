"""Audio sources for pretraining: a procedural default corpus and a folder of audio files."""
from .folder import AudioFolder
from .synthetic import SyntheticCorpus

__all__ = ["AudioFolder", "SyntheticCorpus"]
