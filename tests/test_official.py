"""The authors' fixtures: spectrogram, codes, tokens, frames, masked loss, for both model variants."""
import pytest
import torch

from bestrq2 import BestRQ2, BestRQ2Encoder
from bestrq2.frontend import LogMel, patchify, truncate_to_patches
from bestrq2.official import read_state_dict
from conftest import rel_err, wave_of

TOL = 1e-4  # relative, the bar; observed here: <= 1e-6


@pytest.fixture(scope="module")
def models(fixtures):
    w = fixtures["weights"]
    return {
        "rq2": BestRQ2.from_official(w, encoder_heads=4, predictor_heads=4),
        "rq_vit": BestRQ2.from_official(w, encoder_heads=4, one_stage=True),
        "enc": BestRQ2Encoder.from_official(w, encoder_heads=4),
    }


@pytest.mark.parametrize("clip", ["batch", "short"])
def test_spectrogram_and_patches(fixtures, clip):
    spec = LogMel()(wave_of(fixtures, clip))
    assert rel_err(spec, fixtures["rq2"][f"{clip}.spec_db"][:, 0]) < TOL
    raw = patchify(truncate_to_patches(spec))
    assert rel_err(raw, fixtures["rq2"][f"{clip}.raw_patches"]) < TOL


@pytest.mark.parametrize("clip", ["batch", "short"])
def test_codes(fixtures, models, clip):
    codes = models["rq2"].targets(wave_of(fixtures, clip))[..., 0]
    ref = fixtures["rq2"][f"{clip}.codes"]
    margin = fixtures["rq2"][f"{clip}.codes_margin"]
    assert bool(((codes == ref) | (margin < 1e-6)).all())
    assert bool((codes == ref).all())  # the smallest margin in this set is 1.3e-3: no ties


@pytest.mark.parametrize("clip", ["batch", "short"])
def test_patch_embedding(fixtures, models, clip):
    raw = fixtures["rq2"][f"{clip}.raw_patches"]
    emb = models["enc"].patch_embed(raw)
    assert rel_err(emb, fixtures["rq2"][f"{clip}.patch_embed"]) < TOL


@pytest.mark.parametrize("clip", ["batch", "short"])
def test_encoder_tokens_and_frames(fixtures, models, clip):
    wave = wave_of(fixtures, clip)
    with torch.no_grad():
        assert rel_err(models["enc"].tokens(wave), fixtures["rq2"][f"{clip}.encoder_out"]) < TOL
        assert rel_err(models["enc"](wave), fixtures["rq2"][f"{clip}.frame_emb"]) < TOL


def test_long_clip_chunked_like_xares(fixtures, models):
    frames = models["enc"](wave_of(fixtures, "long"))
    assert frames.shape == (1, 21, 128)
    assert rel_err(frames, fixtures["rq2"]["long.frame_emb"]) < TOL


@pytest.mark.parametrize("clip", ["batch", "short"])
def test_two_stage_masked_path(fixtures, models, clip):
    ref = fixtures["rq2"]
    with torch.no_grad():
        out = models["rq2"](wave_of(fixtures, clip), mask=fixtures["inputs"][f"{clip}.mask"])
    assert torch.equal(out.targets[..., 0], ref[f"{clip}.masked.targets"])
    assert abs(out.loss.item() - ref[f"{clip}.masked.loss"].item()) <= TOL * ref[f"{clip}.masked.loss"].item()
    logits = out.logits[:, :, 0]
    if clip == "batch":
        assert rel_err(logits, ref["batch.masked.logits"]) < TOL
    else:
        assert rel_err(logits.logsumexp(-1), ref["short.masked.logits_logsumexp"]) < TOL
        assert rel_err(logits.max(-1).values, ref["short.masked.logits_max"]) < TOL
        assert torch.equal(logits.argmax(-1), ref["short.masked.logits_argmax"])


@pytest.mark.parametrize("clip", ["batch", "short"])
def test_one_stage_masked_path(fixtures, models, clip):
    ref = fixtures["rq_vit"]
    with torch.no_grad():
        out = models["rq_vit"](wave_of(fixtures, clip), mask=fixtures["inputs"][f"{clip}.mask"])
    assert abs(out.loss.item() - ref[f"{clip}.masked.loss"].item()) <= TOL * ref[f"{clip}.masked.loss"].item()
    logits = out.logits[:, :, 0]
    assert rel_err(logits.logsumexp(-1), ref[f"{clip}.masked.logits_logsumexp"]) < TOL
    tgt = logits.gather(-1, out.targets[..., 0:1])[..., 0]
    assert rel_err(tgt, ref[f"{clip}.masked.logits_at_target"]) < TOL
    assert torch.equal(logits.argmax(-1), ref[f"{clip}.masked.logits_argmax"])


def test_pos_layouts(fixtures, models):
    """'official' reproduces the authors' first-N-rows quirk; 'grid' gives each cell its own row;
    the two agree on 10 s clips."""
    enc_off = models["enc"]
    enc_grid = BestRQ2Encoder.from_official(fixtures["weights"], encoder_heads=4, pos_layout="grid")
    assert enc_off.config.pos_layout == "official" and enc_grid.config.pos_layout == "grid"
    with torch.no_grad():
        short, batch = wave_of(fixtures, "short"), wave_of(fixtures, "batch")
        ref_short = fixtures["rq2"]["short.encoder_out"]
        assert rel_err(enc_off.tokens(short), ref_short) < TOL
        assert rel_err(enc_grid.tokens(short), ref_short) > 1e-2  # a different layout on 3.7 s
        torch.testing.assert_close(enc_grid.tokens(batch), enc_off.tokens(batch), rtol=0, atol=0)
        # grid layout by hand: patch embedding + the (f, t) row of an 8 x 16 table for each cell
        from bestrq2.positions import sincos_table
        table = sincos_table(8, 16, 128)
        raw = fixtures["rq2"]["short.raw_patches"]
        rows = torch.tensor([f * 16 + t for f in range(8) for t in range(5)])
        x = enc_grid.patch_embed(raw) + table[rows]
        torch.testing.assert_close(enc_grid.encoder(x), enc_grid.tokens(short), rtol=1e-5, atol=1e-5)


def test_official_layout_refuses_more_than_128_tokens(fixtures, models):
    wave = torch.randn(1, 200_000) * 0.1  # 12.5 s in one grid of 8 x 20
    with pytest.raises(ValueError, match="official"):
        models["rq2"](wave)


class _NotATensor:
    pass


def test_pickled_ckpt_is_not_unpickled(tmp_path, fixtures):
    sd = read_state_dict(fixtures["weights"])
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, good)
    enc = BestRQ2Encoder.from_official(good, encoder_heads=4)  # plain tensors: weights_only reads it
    assert enc.num_parameters() > 0
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": _NotATensor()}, evil)
    with pytest.raises(ValueError, match="safetensors"):
        BestRQ2Encoder.from_official(evil, encoder_heads=4)
    with pytest.warns(UserWarning, match="allow_pickle"):
        enc2 = BestRQ2Encoder.from_official(evil, encoder_heads=4, allow_pickle=True)
    torch.testing.assert_close(enc2.patch_embed.weight, enc.patch_embed.weight)


def test_wrong_heads_or_sizes_fail_clearly(tmp_path, fixtures):
    with pytest.raises(ValueError, match="divisible"):
        BestRQ2Encoder.from_official(fixtures["weights"], encoder_heads=3)
    with pytest.raises(ValueError, match="do not fit"):
        BestRQ2.from_official(fixtures["weights"], encoder_heads=4, predictor_heads=4, codebook_size=4096)
    with pytest.raises(FileNotFoundError):
        BestRQ2Encoder.from_official(tmp_path / "missing.ckpt")
