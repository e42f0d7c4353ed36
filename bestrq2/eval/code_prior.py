"""Count models of RPQ codes: what a predictor that never looks at the audio, or only at one visible
neighbour's code, gets right. A floor for how much of a masked patch's code its context tells.

``row_prior(codes, rows, k)``: code log-probs per frequency row and pooled; ``context_free_and_neighbour(
train_codes, codes, mask, rows, k)``: held-out loss and accuracy of the unigram, the row unigram and the
neighbour count model on the masked codes. Codes are int [B, N] on the 8 x W grid (token f * W + t).
Used by ``experiments/dig.py``; the code usage statistics are ``bestrq2.codes.usage``.
"""
from __future__ import annotations

import torch


def row_prior(codes, rows: int, k: int, alpha: float = 0.01, beta: float = 20.0):
    """Code log-probs per frequency row [rows, K] and pooled [K]. Pooled: add-alpha frequencies; per row:
    the row's counts with the pooled distribution as a Dirichlet prior of weight beta (rare codes of a
    row borrow from the other rows instead of from a flat 8192-way floor)."""
    flat = codes.reshape(codes.shape[0], rows, -1)  # [B, rows, W] (token f * W + t)
    per_row = torch.stack([torch.bincount(flat[:, f].reshape(-1), minlength=k) for f in range(rows)]).double()
    pooled = (per_row.sum(0) + alpha) / (per_row.sum() + alpha * k)
    row = (per_row + beta * pooled) / (per_row.sum(1, keepdim=True) + beta)
    return row.log(), pooled.log()


def context_free_and_neighbour(train_codes, codes, mask, rows: int, k: int, betas=(1.0, 5.0, 20.0, 100.0)) -> dict:
    """Loss and accuracy on the masked codes of `codes` [B, N] (mask [N]) of three count models fitted on
    `train_codes`: unigram, row unigram, and *neighbour*: p(code | row, code of the nearest visible patch
    in the same row), fitted on adjacent pairs, the row unigram as its Dirichlet prior (weight beta; the
    best of `betas` on these clips is reported, all under "neighbour_by_beta"). A floor for what the
    visible context tells about a masked code."""
    lp_row, lp_pool = row_prior(train_codes, rows, k)
    b, n = codes.shape
    w = n // rows
    grid = train_codes.reshape(-1, rows, w)
    row_ids = torch.arange(rows)[None, :, None].expand(grid.shape[0], rows, w - 1)
    ctx = torch.cat([grid[..., :-1], grid[..., 1:]]).reshape(-1)  # left -> right and right -> left
    tgt = torch.cat([grid[..., 1:], grid[..., :-1]]).reshape(-1)
    rr = torch.cat([row_ids, row_ids]).reshape(-1)
    pair_keys, pair_counts = torch.unique((rr * k + ctx) * k + tgt, return_counts=True)
    masked = mask.nonzero()[:, 0]
    visible = (~mask).reshape(rows, w)
    out = {"unigram": [0.0, 0.0], "row_unigram": [0.0, 0.0], **{f"neighbour_{bt:g}": [0.0, 0.0] for bt in betas}}
    for i in range(b):
        for pos in masked.tolist():
            f, t = divmod(pos, w)
            c = int(codes[i, pos])
            for name, lp in (("unigram", lp_pool), ("row_unigram", lp_row[f])):
                out[name][0] -= float(lp[c])
                out[name][1] += float(lp.argmax() == c)
            cols = visible[f].nonzero()[:, 0]
            counts = torch.zeros(k, dtype=torch.float64)
            if len(cols):
                near = int(cols[(cols - t).abs().argmin()])
                lo = (f * k + int(codes[i, f * w + near])) * k
                sel = (pair_keys >= lo) & (pair_keys < lo + k)
                counts[pair_keys[sel] - lo] = pair_counts[sel].double()
            for bt in betas:
                p = (lp_row[f].exp() * bt + counts) / (bt + counts.sum())
                out[f"neighbour_{bt:g}"][0] -= float(p[c].log())
                out[f"neighbour_{bt:g}"][1] += float(p.argmax() == c)
    m = b * len(masked)
    res = {name: {"loss": v[0] / m, "accuracy": v[1] / m} for name, v in out.items()}
    by_beta = {f"{bt:g}": res.pop(f"neighbour_{bt:g}") for bt in betas}
    best = min(by_beta, key=lambda bt: by_beta[bt]["loss"])
    return {**res, "neighbour": {**by_beta[best], "beta": float(best)}, "neighbour_by_beta": by_beta}
