import pytest
import torch

from bestrq2.masking import check_mask, mask_count, mask_to_indices, sample_mask


def test_counts_follow_uniform_ratio():
    g = torch.Generator().manual_seed(torch.randint(0, 10**6, ()).item())
    counts = torch.tensor([int(sample_mask(1, 128, (0.4, 0.6), "shared", g).sum()) for _ in range(2000)])
    assert counts.min() >= int(0.4 * 128) and counts.max() <= int(0.6 * 128)
    # floor(r * 128) with r ~ U[0.4, 0.6]: mean about 63.5, spread about 7.4
    assert abs(counts.float().mean() - 63.5) < 0.6
    assert abs(counts.float().std() - 128 * 0.2 / 12 ** 0.5) < 0.6


def test_positions_uniform():
    g = torch.Generator().manual_seed(1)
    hits = sum(sample_mask(1, 40, (0.5, 0.5), "shared", g)[0].float() for _ in range(4000))
    freq = hits / 4000  # each position masked with p = 20 / 40
    assert (freq - 0.5).abs().max() < 0.04


def test_shared_and_per_sample():
    g = torch.Generator().manual_seed(2)
    s = sample_mask(4, 128, mode="shared", generator=g)
    assert all(torch.equal(s[0], s[i]) for i in range(4))
    p = sample_mask(4, 128, mode="per_sample", generator=g)
    counts = p.sum(1)
    assert (counts == counts[0]).all()
    assert not all(torch.equal(p[0], p[i]) for i in range(1, 4))


def test_indices_ascending_and_complementary():
    m = sample_mask(3, 40, mode="per_sample")
    mi, ki = mask_to_indices(m)
    for b in range(3):
        assert torch.equal(mi[b], m[b].nonzero().flatten())
        assert torch.equal(ki[b], (~m[b]).nonzero().flatten())


def test_bad_masks_rejected():
    with pytest.raises(ValueError, match="same number"):
        check_mask(torch.tensor([[True, False, False], [True, True, False]]), 2, 3)
    with pytest.raises(ValueError, match="shape"):
        check_mask(torch.zeros(5, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="between 1"):
        check_mask(torch.zeros(4, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="bool"):
        check_mask(torch.zeros(4), 2, 4)
    with pytest.raises(ValueError, match="mode"):
        sample_mask(2, 8, mode="block")


def test_count_clamped_to_leave_targets_and_context():
    assert mask_count(8, 0.01) == 1 and mask_count(8, 0.99) == 7 and mask_count(128, 0.5) == 64
