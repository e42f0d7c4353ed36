"""The quantizer reference against brute force, its frozen buffers, and several codebooks."""
import math

import pytest
import torch

from bestrq2.quantizer import RandomProjectionQuantizer, rpq_codes_ref, rpq_scores_ref


def brute_force(patches, projection, codebooks):
    """One patch, one codebook, one code at a time, in float64."""
    m, c = patches.shape[0], projection.shape[0]
    out = torch.empty(m, c, dtype=torch.long)
    best = torch.empty(m, c, dtype=torch.float64)
    for i in range(m):
        for j in range(c):
            z = patches[i].double() @ projection[j].double()
            z = z / z.norm().clamp_min(1e-12)
            scores = [float(z @ codebooks[j, k].double()) for k in range(codebooks.shape[1])]
            out[i, j] = max(range(len(scores)), key=lambda k: (scores[k], -k))
            best[i, j] = max(scores)
    return out, best


@pytest.mark.parametrize("c,k", [(1, 97), (3, 64)])
def test_reference_matches_brute_force(c, k):
    q = RandomProjectionQuantizer(256, 16, k, c, seed=torch.randint(0, 1000, ()).item())
    patches = torch.randn(13, 256) * 30 - 50  # dB-like values
    codes = rpq_codes_ref(patches, q.projection, q.codebooks)
    ref, best = brute_force(patches, q.projection, q.codebooks)
    assert codes.shape == (13, c) and codes.dtype == torch.long
    scores = rpq_scores_ref(patches, q.projection, q.codebooks)
    chosen = scores.gather(-1, codes[..., None])[..., 0].double()
    assert torch.allclose(chosen, best, atol=1e-5)  # by score: ties may pick another index
    top2 = scores.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-5
    assert torch.equal(codes[clear], ref[clear])


def test_buffers_are_frozen_and_well_formed():
    q = RandomProjectionQuantizer(256, 16, 8192, 2, seed=3)
    assert not any(True for _ in q.parameters())
    assert q.projection.shape == (2, 256, 16) and q.codebooks.shape == (2, 8192, 16)
    torch.testing.assert_close(q.codebooks.norm(dim=-1), torch.ones(2, 8192))
    bound = math.sqrt(6 / (256 + 16))
    assert q.projection.abs().max() <= bound and q.projection.abs().max() > 0.9 * bound
    # standard-normal rows before normalisation: about uniform directions, mean near zero
    assert q.codebooks.mean().abs() < 0.01


def test_seed_reproducible_and_distinct():
    a, b, c = (RandomProjectionQuantizer(seed=s) for s in (1, 1, 2))
    assert torch.equal(a.codebooks, b.codebooks) and not torch.equal(a.codebooks, c.codebooks)


def test_module_forward_any_leading_shape():
    q = RandomProjectionQuantizer(256, 16, 128, 2, seed=0)
    x = torch.randn(2, 5, 256)
    out = q(x)
    assert out.shape == (2, 5, 2)
    torch.testing.assert_close(out.reshape(-1, 2), rpq_codes_ref(x.reshape(-1, 256), q.projection, q.codebooks))
