"""Classifiers on frozen clip embeddings. Inputs: features float [n, D] (one row per clip), integer
labels [n]. Every classifier returns its test predictions, so scores can carry bootstrap intervals.

- ``logistic_probe`` (the default): features standardised with the train split's mean and std, then an
  L2-regularised multinomial logistic regression fitted to convergence by full-batch L-BFGS in float64
  (a strictly convex problem: one optimum, no seed, no epoch count to under-train). The L2 strength is
  chosen on val from ``L2_GRID`` (best val accuracy; ties go to the stronger penalty), then the model
  fitted on train with it is scored on test.
- ``xares_probe``: X-ARES's MLP probe (LayerNorm + Linear, Adam 1e-3, batch 32, cosine decay), trained
  until val accuracy has not improved for ``patience`` epochs (at most ``epochs``); the best val epoch is
  scored. Stochastic: report it as mean +- std over seeds. For comparison with published X-ARES tables.
- ``knn_classify``: standardised (train statistics), L2-normalised features, cosine similarity, k = 10
  neighbours, votes weighted by exp(sim / 0.07).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class ProbeResult:
    test_accuracy: float
    val_accuracy: float
    predictions: torch.Tensor  # int64 [n_test]
    l2: float | None = None  # logistic: the chosen strength
    best_epoch: int | None = None  # xares: the epoch kept


@dataclass
class KnnResult:
    test_accuracy: float
    predictions: torch.Tensor


def _check(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: features must be [n, D] and labels [n], got {list(x.shape)} and {list(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no examples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: features hold NaN or inf")


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """(x - mean) / std with the train split's statistics (a constant feature gets std 1), float64."""
    train = train.double()
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 1e-12 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
    return [(t.double() - mean) / std for t in (train, *others)]


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y.long()).double().mean())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, loss = mean CE + l2 / 2 * ||W||^2 (bias free), from zeros by
    L-BFGS with a strong-Wolfe line search until the gradient is below 1e-7: (W [D, C], b [C])."""
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    y = y.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def logistic_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                   test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                   l2_grid: tuple[float, ...] = L2_GRID) -> ProbeResult:
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        _check(name, x, y)
    xtr, xva, xte = standardize(train[0], val[0], test[0])
    best = None
    for l2 in sorted(l2_grid, reverse=True):  # strongest first: a tie keeps the simpler model
        w, b = fit_logistic(xtr, train[1], num_classes, l2)
        acc = _accuracy((xva @ w + b).argmax(1), val[1])
        if best is None or acc > best[0]:
            best = (acc, l2, w, b)
    acc, l2, w, b = best
    pred = (xte @ w + b).argmax(1)
    return ProbeResult(_accuracy(pred, test[1]), acc, pred, l2=l2)


def xares_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                test: tuple[torch.Tensor, torch.Tensor], num_classes: int, epochs: int = 1000, patience: int = 50,
                lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> ProbeResult:
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        _check(name, x, y)
    g = torch.Generator().manual_seed(seed)
    dim = train[0].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(train[0].shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    xs, ys = train[0].float(), train[1].long()

    def predict(x):
        with torch.no_grad():
            return model(x.float()).argmax(1)

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
        acc = _accuracy(predict(val[0]), val[1])
        if acc > best[0]:
            best = (acc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= patience:  # early stopping on val
            break
    model.load_state_dict(best[2])
    model.eval()
    pred = predict(test[0])
    return ProbeResult(_accuracy(pred, test[1]), best[0], pred, best_epoch=best[1])


def linear_probe(train, val, test, num_classes: int, epochs: int = 100, lr: float = 1e-3, batch_size: int = 32,
                 seed: int = 0) -> ProbeResult:
    """The X-ARES probe at a fixed epoch budget without early stopping (the earlier default)."""
    return xares_probe(train, val, test, num_classes, epochs=epochs, patience=epochs, lr=lr,
                       batch_size=batch_size, seed=seed)


def knn_classify(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, k: int = 10, temperature: float = 0.07) -> KnnResult:
    _check("train", *train)
    _check("test", *test)
    xtr, xte = standardize(train[0], test[0])
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    sim = xte @ xtr.T  # [n_test, n_train]
    k = min(k, xtr.shape[0])
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(xte.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train[1].long()[idx], torch.exp(top / temperature))
    pred = votes.argmax(1)
    return KnnResult(_accuracy(pred, test[1]), pred)
