"""Evaluation with the X-ARES protocol: frozen encoder, mean-pooled frames, a linear probe and kNN."""
from .probe import KnnResult, ProbeResult, knn_classify, linear_probe
from .tasks import ManifestTask, group_split, read_manifest

__all__ = ["KnnResult", "ManifestTask", "ProbeResult", "group_split", "knn_classify", "linear_probe", "read_manifest"]
