"""Target options and target health: rpq_norm in the model and the training loop (bin statistics
estimated once, saved, kept on resume), code perplexity / codes used per step."""
import csv
import math

import pytest
import torch

from bestrq2 import BestRQ2, BestRQ2Config
from bestrq2.checkpoints import latest_checkpoint
from bestrq2.train import TrainConfig, code_health, pretrain


def test_code_health_on_known_streams():
    k = 16
    uniform4 = torch.zeros(k)
    uniform4[[1, 5, 9, 13]] = 25.0
    ppl, used = code_health(uniform4).tolist()
    assert ppl == pytest.approx(4.0) and used == 4
    one = torch.zeros(k)
    one[3] = 7.0
    assert code_health(one).tolist() == pytest.approx([1.0, 1.0])
    skew = torch.tensor([3.0, 1.0] + [0.0] * (k - 2))  # p = (0.75, 0.25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert code_health(skew)[0].item() == pytest.approx(math.exp(h))
    assert code_health(torch.zeros(k)).tolist() == [1.0, 0.0]  # nothing counted: no nan


@pytest.mark.parametrize("norm", ["patch", "bin"])
def test_model_targets_follow_rpq_norm(norm):
    cfg = BestRQ2Config.preset("tiny", encoder_depth=1, predictor_depth=1, codebook_size=512, rpq_norm=norm)
    model = BestRQ2(cfg)
    wave = torch.randn(2, 48_000) * 0.1
    if norm == "bin":
        with pytest.raises(ValueError, match="per-bin statistics"):
            model.targets(wave)
        spec = model.frontend(wave)
        model.quantizer.set_bin_stats(spec.mean((0, 2)), spec.std((0, 2)), spec.shape[0] * spec.shape[2])
    plain = BestRQ2(BestRQ2Config.preset("tiny", encoder_depth=1, predictor_depth=1, codebook_size=512))
    codes, ref = model.targets(wave), plain.targets(wave)
    assert codes.shape == ref.shape and not torch.equal(codes, ref)
    out = model(wave)
    assert torch.equal(out.targets, codes[:, out.mask[0]])


def test_bin_stats_estimated_once_and_kept_on_resume(tmp_path):
    cfg = BestRQ2Config.preset("tiny", encoder_depth=1, predictor_depth=1, rpq_norm="bin")
    tc = TrainConfig(preset="tiny", steps=4, batch_size=2, seconds=1.0, out=str(tmp_path / "r"), num_workers=0,
                     progress=False)
    pretrain(tc, model_cfg=cfg, stop_after=2)
    first = torch.load(latest_checkpoint(tmp_path / "r"), weights_only=True)["model"]
    assert float(first["quantizer.bin_count"]) > 0 and float(first["quantizer.bin_std"].min()) > 0
    pretrain(tc, resume=True)
    last = torch.load(latest_checkpoint(tmp_path / "r"), weights_only=True)
    assert last["step"] == 4
    for k in ("quantizer.bin_mean", "quantizer.bin_std", "quantizer.bin_count"):
        assert torch.equal(last["model"][k], first[k])  # frozen: the resumed run kept them
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert len(rows) == 4
    for r in rows:  # target health, logged per step
        ppl, used = float(r["code_perplexity"]), int(r["codes_used"])
        assert 1.0 <= ppl <= used <= 8192


def test_codes_command(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from bestrq2.cli import main
    from bestrq2.data.synthetic import synth_clip

    for i in range(3):
        sf.write(tmp_path / f"c{i}.wav", synth_clip(1, i, 3.0), 16000)
    sf.write(tmp_path / "short.wav", np.zeros(4000, dtype=np.float32), 16000)  # under one patch: left out
    assert main(["codes", str(tmp_path), "--plot", str(tmp_path / "h.png"), "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    assert "3 clips, 96 patches, rpq_norm=none" in text and "perplexity" in text and "band (mel bins)" in text
    import json

    res = json.loads((tmp_path / "c.json").read_text())
    assert res["overall"]["codes_used"] <= 96 and len(res["bands"]) == 8 and (tmp_path / "h.png").is_file()
    assert main(["codes", str(tmp_path), "--rpq-norm", "patch"]) == 0
    assert "rpq_norm=patch" in capsys.readouterr().out
    assert main(["codes", str(tmp_path / "nothing")]) == 2


def test_prepare_debian_on_fake_packages(tmp_path, monkeypatch, capsys):
    """prepare --debian without the network: fetch_package returns fake unpacked trees; hours per package
    are recorded, a package without audio is reported, eval packages are refused."""
    import json

    import numpy as np
    import soundfile as sf

    import bestrq2.eval.debian as D
    from bestrq2.cli import main

    def fake_fetch(name, cache):
        root = tmp_path / "roots" / name
        if name == "empty-data":
            (root / "usr").mkdir(parents=True, exist_ok=True)
            return root
        d = root / "usr" / "share" / "games" / name / "sounds"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            sf.write(d / f"s{i}.wav", (np.random.default_rng(i).standard_normal(16000 * (i + 1)) * 0.1).astype(np.float32), 16000)
        meta = json.loads((cache / "packages.json").read_text()) if (cache / "packages.json").exists() else {}
        meta[name] = {"version": "1.0-1", "licences": ["GPL-2+"]}
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "packages.json").write_text(json.dumps(meta))
        return root

    monkeypatch.setattr(D, "fetch_package", fake_fetch)
    out = tmp_path / "corpus"
    assert main(["prepare", "--debian", "pingus-data,empty-data,tuxpaint-data", str(out), "--cache",
                 str(tmp_path / "cache"), "--no-progress", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "pingus-data 1.0-1: 3 clips, 0.00 h" in text and "prepared 6 clips" in text
    meta = json.loads((out / "packages.json").read_text())
    assert meta["packages"]["pingus-data"]["hours"] == pytest.approx(6 / 3600) and "empty-data" in meta["failed"]
    res = pretrain(TrainConfig(preset="tiny", steps=1, batch_size=2, seconds=1.0, data=str(out), out=str(tmp_path / "r"),
                               num_workers=0, progress=False))
    assert len(res["losses"]) == 1
    assert main(["prepare", "--debian", "hedgewars-data", str(tmp_path / "x")]) == 2
    assert "eval tasks" in capsys.readouterr().err
