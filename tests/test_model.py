"""Model structure, parameter counts, masked-path behaviour, padding and gradients."""
import json
from pathlib import Path

import pytest
import torch

from bestrq2 import BestRQ2, BestRQ2Config, BestRQ2Encoder
from bestrq2.kernels import gather_tokens_ref as gather_tokens
from bestrq2.kernels import scatter_tokens_ref
from bestrq2.model import IGNORE

PAPER_KEYS = Path(__file__).parent / "fixtures" / "official" / "keys_best_rq2_paper.json"


def tiny(**kw):
    return BestRQ2Config.preset("tiny", **kw)


def test_base_parameter_counts_match_the_authors():
    counts = json.loads(PAPER_KEYS.read_text())["counts"]
    enc = BestRQ2Encoder(BestRQ2Config.preset("base"))
    assert enc.num_parameters() == 85_253_376 == counts["encoder_with_patch_embed_trainable (inference encoder)"]
    full = BestRQ2(BestRQ2Config.preset("base"))
    assert full.num_parameters() == counts["full_module_trainable"] == 120_497_408
    one = BestRQ2(BestRQ2Config.preset("base", one_stage=True))
    assert one.num_parameters() == 91_553_792  # keys_best_rq_vit_paper.json
    assert full.quantizer.projection.shape == (1, 256, 16) and full.quantizer.codebooks.shape == (1, 8192, 16)


def test_presets_and_config_errors():
    for name in ("tiny", "small", "base"):
        assert BestRQ2Config.preset(name).encoder_dim % BestRQ2Config.preset(name).encoder_heads == 0
    with pytest.raises(ValueError, match="unknown preset"):
        BestRQ2Config.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        BestRQ2Config(encoder_dim=100, encoder_heads=3)
    with pytest.raises(ValueError, match="mask_mode"):
        BestRQ2Config(mask_mode="block")
    with pytest.raises(ValueError, match="pos_layout"):
        BestRQ2Config(pos_layout="rope")
    with pytest.raises(ValueError, match="unknown fields"):
        BestRQ2Config.from_dict({"encoder_width": 3})
    cfg = tiny(num_codebooks=3, mask_mode="per_sample")
    assert BestRQ2Config.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("one_stage", [False, True])
@pytest.mark.parametrize("codebooks", [1, 3])
def test_forward_shapes_and_grads(one_stage, codebooks):
    cfg = tiny(one_stage=one_stage, num_codebooks=codebooks, codebook_size=256, encoder_depth=2, predictor_depth=1)
    model = BestRQ2(cfg)
    wave = torch.randn(2, 48_000) * 0.1  # 3 s -> W = 4, N = 32
    out = model(wave)
    m = int(out.mask[0].sum())
    assert out.logits.shape == (2, m, codebooks, 256) and out.targets.shape == (2, m, codebooks)
    assert out.mask.shape == (2, 32) and 0.4 * 32 - 1 <= m <= 0.6 * 32
    assert torch.isfinite(out.loss) and 0 <= float(out.accuracy) <= 1
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    token = "mask_token" if one_stage else "predictor.mask_token"
    assert grads[token].abs().sum() > 0 and grads["encoder.patch_embed.weight"].abs().sum() > 0


def test_targets_match_codes_at_mask():
    model = BestRQ2(tiny(codebook_size=512))
    wave = torch.randn(3, 40_000) * 0.1
    mask = torch.zeros(3, 8 * 4, dtype=torch.bool)
    mask[:, [1, 5, 9, 30]] = True
    out = model(wave, mask=mask)
    codes = model.targets(wave)
    assert codes.shape == (3, 32, 1)
    assert torch.equal(out.targets, codes[:, [1, 5, 9, 30]])


def test_loss_is_mean_over_codebooks_of_cross_entropy():
    model = BestRQ2(tiny(num_codebooks=2, codebook_size=64))
    out = model(torch.randn(2, 20_000) * 0.1)
    lg, tg = out.logits.double(), out.targets
    ce = [torch.nn.functional.cross_entropy(lg[:, :, c].reshape(-1, 64), tg[:, :, c].reshape(-1)) for c in range(2)]
    assert abs(out.loss.item() - (ce[0] + ce[1]).item() / 2) < 1e-5


def test_fixed_mask_makes_step_deterministic():
    model = BestRQ2(tiny()).eval()
    wave = torch.randn(2, 30_000) * 0.1
    mask = torch.rand(8 * 3) < 0.5
    mask[0], mask[1] = True, False
    a, b = model(wave, mask=mask), model(wave, mask=mask)
    assert a.loss.item() == b.loss.item()
    assert torch.equal(a.mask, mask.expand(2, -1))



def test_position_table_kept_per_grid():
    """The sincos table is built once per grid and kept: the same tensor (and the same loss) at the next
    step, the rows positions_for gives, one per clip length, a normal tensor even when first built under
    inference_mode (training after it backpropagates), never in the state dict."""
    from bestrq2.positions import positions_for

    model = BestRQ2(tiny()).eval()  # no drop path: the same loss twice
    wave = torch.randn(2, 30_000) * 0.1
    mask = torch.rand(8 * 3) < 0.5
    mask[0], mask[1] = True, False
    with torch.inference_mode():
        first = model(wave, mask=mask).loss.item()
    tables = dict(model._pos_tables)
    assert len(tables) == 1 and not next(iter(tables.values())).is_inference()
    out = model(wave, mask=mask)
    out.loss.backward()  # the table from inference mode in a graph that is differentiated
    assert out.loss.item() == first
    assert all(model._pos_tables[k] is v for k, v in tables.items())
    (n, width, dim, layout, _), table = next(iter(tables.items()))
    assert torch.equal(table, positions_for(torch.arange(n), width, dim, layout))
    model(torch.randn(2, 20_000) * 0.1)  # another clip length, another table
    assert len(model._pos_tables) == 2
    assert not any("pos_table" in k for k in model.state_dict())

def test_per_sample_masks_differ_and_match_single_runs():
    model = BestRQ2(tiny(mask_mode="per_sample")).eval()
    wave = torch.randn(3, 30_000) * 0.1
    out = model(wave)
    assert not torch.equal(out.mask[0], out.mask[1])
    for b in range(3):  # each clip alone with its own mask: the same logits
        alone = model(wave[b: b + 1], mask=out.mask[b])
        torch.testing.assert_close(alone.logits, out.logits[b: b + 1], rtol=1e-5, atol=1e-5)


def test_padding_patches_are_not_targets_unless_asked():
    wave = torch.randn(2, 80_000) * 0.1
    lengths = torch.tensor([80_000, 30_000])
    mask = torch.ones(8 * 8, dtype=torch.bool)
    mask[::2] = False
    for on_padding in (False, True):
        model = BestRQ2(tiny(loss_on_padding=on_padding)).eval()
        out = model(wave * (torch.arange(80_000) < lengths[:, None]), lengths, mask=mask)
        ignored = out.targets == IGNORE
        assert not bool(ignored[0].any())
        # clip 1: 30 000 samples; columns t with 16 t * 625 - 1024 >= 30 000 (t >= 4) are padding
        t_of = out.mask_idx[1] % 8
        assert torch.equal(ignored[1, :, 0], (t_of >= 4) & (not on_padding))


def test_drop_path_only_in_training():
    model = BestRQ2(tiny(encoder_drop_path=0.5))
    wave = torch.randn(2, 20_000) * 0.1
    mask = torch.arange(16) % 2 == 0  # 20 000 samples: W = 2, N = 16
    model.eval()
    assert model(wave, mask=mask).loss.item() == model(wave, mask=mask).loss.item()
    model.train()
    losses = {round(model(wave, mask=mask).loss.item(), 6) for _ in range(6)}
    assert len(losses) > 1
    rates = [blk.drop_path.p for blk in model.encoder.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.5) < 1e-6 and rates == sorted(rates)


def test_gather_scatter_reference_ops():
    x = torch.randn(2, 10, 4)
    idx = torch.tensor([[0, 3, 9], [2, 5, 7]])
    torch.testing.assert_close(gather_tokens(x, idx), torch.stack([x[0, [0, 3, 9]], x[1, [2, 5, 7]]]))
    rest = torch.stack([torch.tensor([i for i in range(10) if i not in r]) for r in idx.tolist()])
    fill, pos = torch.randn(4), torch.randn(10, 4)
    out = scatter_tokens_ref(gather_tokens(x, idx), idx, fill, rest, pos)
    torch.testing.assert_close(gather_tokens(out, idx), gather_tokens(x, idx))
    torch.testing.assert_close(gather_tokens(out, rest), fill + pos[rest])


def test_encoder_export_keeps_pretrained_weights(tmp_path):
    model = BestRQ2(tiny())
    enc = model.to_encoder()
    wave = torch.randn(1, 40_000) * 0.1
    enc.save_pretrained(tmp_path / "e")
    again = BestRQ2Encoder.from_pretrained(tmp_path / "e")
    torch.testing.assert_close(again(wave), enc(wave), rtol=0, atol=0)
    assert set(again.state_dict()) == {k for k in model.state_dict() if k.startswith("encoder.")}
