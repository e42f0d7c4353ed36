"""Classifiers on frozen clip embeddings, as X-ARES scores them.

- ``linear_probe``: LayerNorm + Linear trained with Adam (lr 1e-3) and cosine decay; the epoch with the
  best validation accuracy is kept and scored on test.
- ``knn_classify``: cosine similarity, k = 10 neighbours, votes weighted by exp(sim / 0.07).
Inputs: features float [n, D] (one row per clip), integer labels [n].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ProbeResult:
    test_accuracy: float
    val_accuracy: float
    best_epoch: int


@dataclass
class KnnResult:
    test_accuracy: float


def _check(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: features must be [n, D] and labels [n], got {list(x.shape)} and {list(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no examples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: features hold NaN or inf")


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], num_classes: int, epochs: int = 100, lr: float = 1e-3,
                 batch_size: int = 32, seed: int = 0) -> ProbeResult:
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        _check(name, x, y)
    g = torch.Generator().manual_seed(seed)
    dim = train[0].shape[1]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(train[0].shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    xs, ys = train[0].float(), train[1].long()

    def accuracy(x, y):
        with torch.no_grad():
            return float((model(x.float()).argmax(1) == y.long()).float().mean())

    best = (-1.0, 0, None)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(xs.shape[0], generator=g)
        for i in range(0, xs.shape[0], batch_size):
            idx = order[i: i + batch_size]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc = accuracy(*val)
        if acc > best[0]:
            best = (acc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    return ProbeResult(test_accuracy=accuracy(*test), val_accuracy=best[0], best_epoch=best[1])


def knn_classify(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, k: int = 10, temperature: float = 0.07) -> KnnResult:
    _check("train", *train)
    _check("test", *test)
    xtr = F.normalize(train[0].float(), dim=1)
    xte = F.normalize(test[0].float(), dim=1)
    sim = xte @ xtr.T  # [n_test, n_train]
    k = min(k, xtr.shape[0])
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(xte.shape[0], num_classes)
    votes.scatter_add_(1, train[1].long()[idx], torch.exp(top / temperature))
    return KnnResult(test_accuracy=float((votes.argmax(1) == test[1].long()).float().mean()))
