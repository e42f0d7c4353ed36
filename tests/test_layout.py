"""The code's shape as a contract: weight names of earlier layouts still load (checkpoints, encoders,
optimizer states), one per-op implementation switch that is resolved once and saved, and every
environment variable read in one place and documented."""
import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

from bestrq2 import BestRQ2, BestRQ2Config, BestRQ2Encoder
from bestrq2.config import OPS
from bestrq2.env import VARIABLES
from bestrq2.model import upgrade_key

ROOT = Path(__file__).parent.parent
LEGACY = {"encoder.patch_embed.": "patch_embed.", "predictor.input_proj.": "predictor_input_proj.",
          "predictor.mask_token": "mask_token"}


def tiny(**kw):
    return BestRQ2Config.preset("tiny", **{"encoder_depth": 1, "predictor_depth": 1, "codebook_size": 256, **kw})


def to_legacy(name: str) -> str:
    for new, old in LEGACY.items():
        if name.startswith(new):
            return old + name[len(new):]
    return name


@pytest.mark.parametrize("one_stage", [False, True])
def test_earlier_weight_names_load(one_stage):
    torch.manual_seed(0)
    model = BestRQ2(tiny(one_stage=one_stage))
    old = {to_legacy(k): v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("patch_embed.") for k in old) and "mask_token" in old
    assert {upgrade_key(k, one_stage) for k in old} == set(model.state_dict())
    torch.manual_seed(1)
    fresh = BestRQ2(tiny(one_stage=one_stage))
    fresh.load_state_dict(old)  # strict: every name found
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    enc = BestRQ2Encoder(model.config)
    enc.load_state_dict({k: v for k, v in old.items() if k.startswith(("patch_embed.", "encoder."))})
    wave = torch.randn(1, 20_000) * 0.1
    torch.testing.assert_close(enc(wave), model.to_encoder()(wave))


def test_resume_from_a_checkpoint_with_earlier_names(tmp_path):
    """A checkpoint written before the ContextEncoder / Predictor modules (model and optimizer keyed by
    the old names) resumes and continues exactly as the run would have."""
    from bestrq2.checkpoints import latest_checkpoint
    from bestrq2.train import TrainConfig, pretrain

    kw = dict(preset="tiny", steps=4, batch_size=2, seconds=1.0, ckpt_every=100, num_workers=0, progress=False,
              lr=1e-3)
    full = pretrain(TrainConfig(out=str(tmp_path / "full"), **kw), tiny())["losses"]
    pretrain(TrainConfig(out=str(tmp_path / "cut"), **kw), tiny(), stop_after=2)
    path = latest_checkpoint(tmp_path / "cut")
    state = torch.load(path, weights_only=True)
    state["model"] = {to_legacy(k): v for k, v in state["model"].items()}
    opt = state["optimizer"]
    opt["state"] = {to_legacy(k): v for k, v in opt["state"].items()}
    for g in opt["param_groups"]:
        g["params"] = [to_legacy(k) for k in g["params"]]
    assert "patch_embed.weight" in state["model"] and "patch_embed.weight" in opt["state"]
    torch.save(state, path)
    rest = pretrain(TrainConfig(out=str(tmp_path / "cut"), **kw), tiny(), resume=True)["losses"]
    assert rest == full[2:]


def test_one_switch_resolved_once_and_saved(monkeypatch, tmp_path):
    monkeypatch.delenv("BESTRQ2_KERNELS", raising=False)
    monkeypatch.delenv("BESTRQ2_ATTENTION", raising=False)
    model = BestRQ2(tiny(kernels={"head": "torch", "attention": "math"}))
    assert model.config.kernels == {op: "auto" for op in OPS} | {"head": "torch", "attention": "math"}
    assert model.encoder.attention == "math" and model.predictor.blocks[0].impl == "auto"
    monkeypatch.setenv("BESTRQ2_KERNELS", "reference")  # after the build: changes nothing built
    assert model.quantizer.impl == "auto"
    model = BestRQ2(tiny())  # at the build: every kernel op, recorded in the config it saves
    assert {model.config.kernels[op] for op in OPS if op != "attention"} == {"reference"}
    assert BestRQ2Config.from_dict(model.config.to_dict()) == model.config
    monkeypatch.setenv("BESTRQ2_KERNELS", "fast")
    with pytest.raises(ValueError, match="BESTRQ2_KERNELS must be one of"):
        BestRQ2(tiny())
    with pytest.raises(ValueError, match="unknown op 'rpqq'"):
        tiny(kernels={"rpqq": "auto"})
    with pytest.raises(ValueError, match=r"kernels\['head'\] must be one of"):
        tiny(kernels={"head": "flash"})
    # configs saved before the switch: attention and fused_head were fields of their own
    old = {k: v for k, v in tiny().to_dict().items() if k != "kernels"} | {"attention": "sdpa", "fused_head": False}
    assert BestRQ2Config.from_dict(old).kernels == {"attention": "sdpa", "head": "reference"}
    # an exported encoder runs anywhere: its ops go back to auto
    monkeypatch.delenv("BESTRQ2_KERNELS")
    enc = BestRQ2(tiny(kernels={"rpq": "reference", "attention": "math"})).to_encoder()
    assert enc.config.kernels == {op: "auto" for op in OPS}


def test_resume_may_change_the_kernels_but_not_the_model(tmp_path, monkeypatch):
    from bestrq2.train import TrainConfig, pretrain

    monkeypatch.delenv("BESTRQ2_KERNELS", raising=False)  # it would override the kernels given here

    kw = dict(preset="tiny", steps=3, batch_size=2, seconds=1.0, ckpt_every=100, num_workers=0, progress=False)
    pretrain(TrainConfig(out=str(tmp_path), **kw), tiny(), stop_after=1)
    pretrain(TrainConfig(out=str(tmp_path), **kw), tiny(kernels={"head": "torch"}), resume=True)
    saved = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model_config"]
    assert saved["kernels"]["head"] == "torch"
    with pytest.raises(ValueError, match="another model config"):
        pretrain(TrainConfig(out=str(tmp_path), **{**kw, "steps": 3}), tiny(codebook_size=512), resume=True)


def test_reference_block_is_the_timm_block():
    """The one Block forward on its reference ops computes the authors' (timm) pre-norm block:
    x + attn(LN(x)), then + fc2(GELU(fc1(LN(x))))."""
    import torch.nn.functional as F

    from bestrq2.transformer import Block

    torch.manual_seed(0)
    blk = Block(32, 4, impl="reference").eval()
    x = torch.randn(3, 7, 32)
    a = blk.attn(F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-5))
    h = x + a
    m = blk.mlp.fc2(F.gelu(blk.mlp.fc1(F.layer_norm(h, (32,), blk.norm2.weight, blk.norm2.bias, 1e-5))))
    torch.testing.assert_close(blk(x), h + m, rtol=1e-5, atol=1e-6)


def test_environment_read_in_one_place_and_documented():
    """Nothing in the package or the benchmarks reads os.environ except bestrq2/env.py, and the README's
    table lists exactly its variables."""
    pattern = re.compile(r"os\.environ\.get|os\.getenv|os\.environ\[\s*[\"'][A-Z_]+[\"']\s*\](?!\s*=)")
    readers = [str(p.relative_to(ROOT)) for d in ("bestrq2", "kernels", "bench") for p in (ROOT / d).rglob("*.py")
               if p.name != "env.py" and pattern.search(p.read_text())]
    assert readers == []
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("Environment variables"):]
    table = table[: table.index("\n\n", table.index("|"))]
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]+)", table))
    assert listed == set(VARIABLES), (listed ^ set(VARIABLES))


def test_read_sees_every_write_to_the_environment(monkeypatch):
    """``env.read`` looks in os.environ's own dict (the fast path): it sees writes through os.environ,
    monkeypatch and ``overridden``, deletions, blanks (the default) and stripping, as os.environ.get does;
    an unknown name is an error whether or not it is set."""
    from bestrq2.env import overridden, read

    name = "BESTRQ2_RPQ_SPLIT"
    monkeypatch.delenv(name, raising=False)
    assert read(name) == "" and read(name, "d") == "d"
    os.environ[name] = " 3 "
    try:
        assert read(name, "d") == "3"
        with overridden(name, "5"):
            assert read(name) == "5"
        assert read(name) == "3"
        os.environ[name] = "   "
        assert read(name, "d") == "d"
    finally:
        del os.environ[name]
    assert read(name, "d") == "d"
    monkeypatch.setenv(name, "7")
    assert read(name) == "7" == os.environ.get(name)
    monkeypatch.setenv("NOT_BESTRQ2_VAR", "1")
    with pytest.raises(KeyError, match="not one of bestrq2's"):
        read("NOT_BESTRQ2_VAR")


def test_inductor_cache_per_aten_capability(monkeypatch):
    """Under ATEN_CPU_CAPABILITY torch.compile's cache moves to a folder per value (inductor's own cache is not
    keyed by it: a kernel vectorised under AVX512, reused under ``default``, failed to build), also from the
    default folder that importing torch._dynamo writes into the variable; a folder the user chose, or no
    capability set, is left alone."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from bestrq2.env import inductor_cache_per_isa

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert inductor_cache_per_isa() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    for cap, preset in (("default", None), ("AVX2", default_cache_dir())):  # unset, or the default torch wrote
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", cap)
        if preset is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", preset)
        want = f"{default_cache_dir()}_aten_{cap.lower()}"
        assert inductor_cache_per_isa() == want == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/mine")
    assert inductor_cache_per_isa() is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/mine"


def test_stage_modules_share_the_encoder():
    """BestRQ2 and BestRQ2Encoder run the same ContextEncoder class; BestRQ2.forward_batch stays short."""
    import inspect

    from bestrq2.context_encoder import ContextEncoder
    from bestrq2.predictor import Predictor

    model = BestRQ2(tiny())
    assert type(model.encoder) is ContextEncoder and type(model.to_encoder().encoder) is ContextEncoder
    assert isinstance(model.predictor, Predictor)
    body = inspect.getsource(BestRQ2.forward_batch).split('"""')[-1]
    assert len([line for line in body.splitlines() if line.strip()]) <= 15
    assert dataclasses.is_dataclass(model.prepare(torch.randn(1, 20_000) * 0.1).plan)


@pytest.mark.parametrize("script", ["claim", "dig", "precision", "retest", "train_precision"])
def test_experiment_scripts_import_the_public_api(script):
    """experiments/*.py run as plain scripts on the installed package (no sys.path tricks)."""
    import subprocess
    import sys

    path = ROOT / "experiments" / f"{script}.py"
    assert "sys.path" not in path.read_text()
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-800:]


def test_setup_installs_every_subpackage_and_data_file():
    """setup.py names every package under bestrq2/ (a plain ``pip install .`` once left out data and
    eval) and ships the non-Python files the package reads."""
    text = (ROOT / "setup.py").read_text()
    listed = set(re.findall(r'"(bestrq2[\w.]*)"', re.search(r"packages=\[(.*?)\]", text).group(1)))
    on_disk = {"bestrq2", "bestrq2.kernels"} | {f"bestrq2.{p.parent.name}" for p in (ROOT / "bestrq2").glob("*/__init__.py")}
    assert listed == on_disk
    data = {p.name for p in (ROOT / "bestrq2").iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")}
    shipped = set(re.findall(r'"([\w.]+\.\w+)"', re.search(r"package_data=\{.*?\}", text, re.S).group(0)))
    assert data <= shipped, data - shipped
