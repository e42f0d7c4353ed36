"""The Triton ops' short eager path (``kernels._op.FastOp``) against the registered ``torch.library`` op: the same
outputs and gradients to the bit, the dispatcher skipped only where it may be, the op kept where it must be."""
import pytest
import torch
from conftest import aten_ops

from bestrq2 import BestRQ2, BestRQ2Config
from bestrq2.config import OPS
from bestrq2.env import overridden
from bestrq2.kernels import _op, add_layer_norm, bias_gelu
from bestrq2.kernels.add_layer_norm import _add_layer_norm_fwd
from bestrq2.kernels.bias_gelu import _bias_gelu_fwd


def _model_step(eager: str, autocast: bool):
    """Loss, accuracy and every parameter's gradient of one forward + backward, every op on Triton."""
    torch.manual_seed(0)
    cfg = BestRQ2Config.preset("tiny", encoder_depth=2, predictor_depth=1, codebook_size=256, encoder_drop_path=0.1,
                               kernels={op: "triton" for op in OPS})
    model = BestRQ2(cfg)
    wave = torch.randn(2, 48_000) * 0.1
    mask = torch.zeros(32, dtype=torch.bool)
    mask[torch.randperm(32)[:15]] = True
    with overridden("BESTRQ2_EAGER_OPS", eager):
        torch.manual_seed(1)  # drop-path draws
        batch = model.prepare(wave, mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.forward_batch(batch)
        out.loss.float().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
def test_model_step_is_bit_equal_through_either_path(autocast):
    """A whole training forward + backward (every Triton op: RPQ, gather, scatter, layer norm, add + layer
    norm, bias + GELU, drop-path residual, attention, the fused head) gives the same loss and gradients to
    the bit with the dispatcher skipped and through it, in float32 and under bf16 autocast."""
    fast, fast_grads = _model_step("1", autocast)
    slow, slow_grads = _model_step("0", autocast)
    assert torch.equal(fast.loss, slow.loss) and torch.equal(fast.targets, slow.targets)
    assert fast_grads.keys() == slow_grads.keys()
    missing = [n for n, g in fast_grads.items() if (g is None) != (slow_grads[n] is None)]
    assert not missing, missing
    differ = [n for n, g in fast_grads.items() if g is not None and not torch.equal(g, slow_grads[n])]
    assert not differ, differ
    assert sum(g is not None for g in fast_grads.values()) > 10


class _Counting:
    """Stands in for a FastOp's registered op: counts the calls that reach the dispatcher."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


def _inputs(requires_grad: bool):
    x, br = torch.randn(33, 24, requires_grad=requires_grad), torch.randn(33, 24, requires_grad=requires_grad)
    w, b = torch.randn(24, requires_grad=requires_grad), torch.randn(24, requires_grad=requires_grad)
    return x, br, w, b


@pytest.mark.parametrize("requires_grad", [False, True])
def test_plain_eager_calls_skip_the_dispatcher(monkeypatch, requires_grad):
    counting = _Counting(_add_layer_norm_fwd.op)
    monkeypatch.setattr(_add_layer_norm_fwd, "op", counting)
    x, br, w, b = _inputs(requires_grad)
    s, y = add_layer_norm(x, br, None, w, b, impl="triton")
    assert counting.calls == 0
    if requires_grad:
        (s.sum() + y.sum()).backward()
        assert x.grad is not None and w.grad is not None
    with overridden("BESTRQ2_EAGER_OPS", "0"):
        s2, y2 = add_layer_norm(x.detach(), br.detach(), None, w.detach(), b.detach(), impl="triton")
    assert counting.calls == 1
    assert torch.equal(s.detach(), s2) and torch.equal(y.detach(), y2)


def test_dispatch_modes_and_subclasses_get_the_registered_op(monkeypatch):
    """Anything that must see the op (a dispatch mode: fake tensors, functionalisation, the benches' op
    counters) or that is not a plain tensor gets the dispatcher."""
    counting = _Counting(_add_layer_norm_fwd.op)
    monkeypatch.setattr(_add_layer_norm_fwd, "op", counting)
    x, br, w, b = _inputs(False)
    seen = aten_ops(lambda: add_layer_norm(x, br, None, w, b, impl="triton"))  # under a dispatch mode
    assert counting.calls == 1 and "bestrq2.add_layer_norm_fwd" in seen

    class Sub(torch.Tensor):
        pass

    _add_layer_norm_fwd(x.as_subclass(Sub), br, None, w, b, 1e-5, torch.float32, None)
    assert counting.calls == 2


def test_ops_without_an_autograd_formula_keep_the_ops_behaviour():
    """A differentiable input to an op that has no backward: the op's own handling (it errs on backward)."""
    @_op.custom_op("bestrq2_test::twice", mutates_args=())
    def twice(x: torch.Tensor, k: float = 2.0) -> torch.Tensor:
        return x * k

    x = torch.randn(5, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(twice(x), x * 2.0)  # the default filled in
        with pytest.raises(RuntimeError, match="missing value for argument"):  # the op's own error, no body call
            twice()
    with pytest.raises(RuntimeError, match="autograd"):
        twice(x).sum().backward()


def test_defaults_reach_setup_context_as_the_op_gives_them():
    """setup_context sees every input, defaults included, as torch.library hands them."""
    seen = {}

    @_op.custom_op("bestrq2_test::scale", mutates_args=())
    def scale(x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
        return x * k

    def setup(ctx, inputs, output):
        seen["inputs"] = len(inputs)
        ctx.k = inputs[1]

    scale.register_autograd(lambda ctx, g: (g * ctx.k, None), setup_context=setup)
    for eager in ("1", "0"):
        x = torch.randn(4, requires_grad=True)
        with overridden("BESTRQ2_EAGER_OPS", eager):
            scale(x).sum().backward()
        assert seen["inputs"] == 2 and torch.equal(x.grad, torch.full((4,), 3.0)), eager


def test_bias_gelu_grads_match_through_either_path():
    """One op end to end with gradients, float32 and bf16 inputs."""
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(37, 48, dtype=dtype)
        bias = torch.randn(48)
        grads = []
        for eager in ("1", "0"):
            hh, bb = h.clone().requires_grad_(), bias.clone().requires_grad_()
            with overridden("BESTRQ2_EAGER_OPS", eager):
                y = bias_gelu(hh, bb, impl="triton")
                y.float().pow(2).sum().backward()
            grads.append((y.detach(), hh.grad, bb.grad))
        for a, b in zip(*grads):
            assert torch.equal(a, b), dtype
    assert isinstance(_bias_gelu_fwd, _op.FastOp)
