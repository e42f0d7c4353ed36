"""Evaluation with the X-ARES protocol: frozen encoder, mean-pooled frames, probes and kNN, intervals."""
from .probe import KnnResult, ProbeResult, knn_classify, linear_probe, logistic_probe, xares_probe
from .stats import accuracy_ci, paired_difference
from .suite import LogMelStats, TaskScore, evaluate_task, markdown, paired, summarize, summarize_ci
from .tasks import ManifestTask, cv_folds, group_split, read_manifest

__all__ = ["KnnResult", "LogMelStats", "ManifestTask", "ProbeResult", "TaskScore", "accuracy_ci", "cv_folds",
           "evaluate_task", "group_split", "knn_classify", "linear_probe", "logistic_probe", "markdown", "paired",
           "paired_difference", "read_manifest", "summarize", "summarize_ci", "xares_probe"]
