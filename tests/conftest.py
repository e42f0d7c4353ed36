"""Test setup. TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set in
pytest_configure, before any test module imports the package; the Triton paths then run on the CPU
under the interpreter. The GPU suite (``pytest -m cuda``) compiles them for the card instead."""
import os
import zlib

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def pytest_configure(config):
    if (config.getoption("markexpr", "") or "").strip() != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _threads_and_seed(request):
    torch.set_num_threads(2)
    # a fresh seed per test (from its name), so inputs differ between tests yet reruns repeat
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(scope="session")
def fixtures():
    from safetensors.torch import load_file

    return {
        "dir": FIXTURES,
        "inputs": load_file(str(FIXTURES / "inputs.safetensors")),
        "rq2": load_file(str(FIXTURES / "outputs_best_rq2.safetensors")),
        "rq_vit": load_file(str(FIXTURES / "outputs_best_rq_vit.safetensors")),
        "weights": FIXTURES / "weights_best_rq2.safetensors",
    }


def wave_of(fx, name: str) -> torch.Tensor:
    return fx["inputs"][f"{name}.waveform_int16"].float()[:, 0] / 32768.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.double()).abs().max() / b.detach().double().abs().max().clamp_min(1e-30))
