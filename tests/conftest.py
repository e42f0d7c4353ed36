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
    from bestrq2.env import inductor_cache_per_isa

    inductor_cache_per_isa()  # `make test` runs again under ATEN_CPU_CAPABILITY=default: no AVX512 kernels reused


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


def aten_ops(fn) -> list[str]:
    """The names of the ATen (and custom) ops ``fn()`` dispatches, in order ("aten.stack", ...)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.double()).abs().max() / b.detach().double().abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- float32 error bounds
# A fixture made by the authors' code in float32 on their machine is compared with ours by the
# flash-attention rule: computed in float64 here (the same computation, on the spot), the fixture's
# error must be at most twice this machine's own float32 error (plus one float32 rounding of the
# stored result). A different FFT or BLAS path moves our float32 error, and the bound with it;
# a wrong formula moves the float64 result away from the fixture by far more than rounding.
# ``sanity`` caps our own float32 error, so a broken float32 path cannot widen the bound unnoticed.
F32_ROUNDING = 2.0 ** -23


def float64_twin(module: torch.nn.Module, exact_filterbank: bool = True) -> torch.nn.Module:
    """A float64 copy of ``module``; ``exact_filterbank`` also rebuilds its frontend's filterbank and
    window in float64 (leave it False when the float32 buffers came from a checkpoint: they are then
    part of the computation, not a rounding of it)."""
    import copy

    from bestrq2.config import N_FFT
    from bestrq2.frontend import LogMel, mel_filterbank

    twin = copy.deepcopy(module).double()
    if exact_filterbank:
        for m in twin.modules():
            if isinstance(m, LogMel):
                m.fb = mel_filterbank(dtype=torch.float64)
                m.window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
    return twin


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_within_float32_error(name: str, ours: torch.Tensor, exact: torch.Tensor, ref: torch.Tensor,
                                sanity: float = 1e-4) -> dict:
    """The rule above, on errors relative to the largest exact value. Returns the figures."""
    scale = float(exact.detach().double().abs().max().clamp_min(1e-30))
    e32, e_ref = max_err(ours, exact) / scale, max_err(ref, exact) / scale
    assert e32 <= sanity, f"{name}: this machine's float32 error {e32:.3g} exceeds the sanity cap {sanity:g}"
    assert e_ref <= 2 * e32 + F32_ROUNDING, (
        f"{name}: the fixture is {e_ref:.3g} from the float64 result, more than twice this machine's "
        f"float32 error ({e32:.3g}) plus one rounding: not rounding, a different computation")
    return {"ours_vs_exact": e32, "fixture_vs_exact": e_ref}


def assert_argmax_within(name: str, ours: torch.Tensor, ref: torch.Tensor, exact_scores: torch.Tensor,
                         tol: float) -> int:
    """Indices equal, except rows whose exact top-2 margin is below ``tol`` (a near-tie that float32
    rounding may flip); there ours must still score within ``tol`` of the best. Returns those rows."""
    top2 = exact_scores.double().topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    differ = ours != ref
    assert bool((~differ | (margin < tol)).all()), (
        f"{name}: {int((differ & (margin >= tol)).sum())} indices differ where the exact margin exceeds {tol:.3g}")
    got = exact_scores.double().gather(-1, ours[..., None])[..., 0]
    assert bool((got >= top2[..., 0] - tol).all()), f"{name}: a chosen index scores more than {tol:.3g} below the best"
    return int(differ.sum())
