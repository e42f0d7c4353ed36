"""``triton_op`` / ``custom_op`` as ``torch.library`` has them, plus a short eager path around the dispatcher.

Why: a call of a ``torch.library`` op in eager mode goes through the dispatcher, the op's generated autograd
wrapper, a redispatch, ``fill_defaults`` and a ``torch._dynamo.disable`` frame before the Python body runs: on a
2-core Xeon about 200 µs a call (``add_layer_norm`` forward: 212 µs through the op, 58 µs for the same body
called directly, launch recorded, not run). A ViT-B training step calls these ops about 140 times (forward and
backward), so on a card that does the step in ~40 ms, that is a large share of the host's time to queue it.

So a decorated op, called in plain eager mode, runs its body directly, and with gradients through one
``torch.autograd.Function`` built from the same ``register_autograd`` backward and setup functions; the body
runs under ``set_wrap_triton_enabled(False)``, as ``triton_op`` itself runs it for plain tensors. Everywhere
else it is the registered op, unchanged: while torch.compile traces, under any dispatch mode (fake tensors,
functionalisation, ``make_fx``, the benches' op counters), under functorch transforms, for tensor subclasses,
with keyword arguments, and for ops that mutate an argument (the dispatcher bumps the version counters of
those). ``BESTRQ2_EAGER_OPS=0`` sends every call through the dispatcher (to compare the two). The result is
the same function: the same body, the same backward, the same autocast state (custom ops have no autocast
kernel, so their bodies run under the caller's autocast either way); tests check both paths give bit-equal
outputs and gradients.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch.library import custom_op as _library_custom_op
from torch.library import triton_op as _library_triton_op

from ..env import read

try:  # what triton_op's own eager body uses: the raw kernel instead of the tracing wrapper (~1 ms a launch)
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # pragma: no cover (a torch without it: every Triton op call takes the registered op)
    set_wrap_triton_enabled = None

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_ops_on() -> bool:
    return read("BESTRQ2_EAGER_OPS", "1").lower() not in ("0", "off", "false")


class FastOp:
    """A registered op (``.op``, the ``torch.library`` ``CustomOpDef``) that plain eager calls run without the
    dispatcher; see the module docstring. ``register_fake`` / ``register_autograd`` go to the op as well."""

    def __init__(self, op, fn: Callable, mutates: bool, triton: bool) -> None:
        self.op = op
        self.fn = fn
        self.mutates = mutates
        self.triton = triton
        self.defaults = [p.default for p in inspect.signature(fn).parameters.values()]  # one per parameter
        self.backward: Callable | None = None
        self.setup: Callable | None = None
        self._function: type[torch.autograd.Function] | None = None
        self.__name__ = getattr(fn, "__name__", "op")
        self.__doc__ = fn.__doc__

    # -------------------------------------------------------------- the registration API, forwarded
    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        self.backward, self.setup = backward, setup_context
        self._function = self._make_function()

    # ------------------------------------------------------------------------------------- calls
    def __call__(self, *args: Any, **kwargs: Any):
        if kwargs or not self._eager(args):
            return self.op(*args, **kwargs)
        if len(args) < len(self.defaults):  # the op fills its defaults before setup_context sees them: so here
            fill = self.defaults[len(args):]
            if any(d is inspect.Parameter.empty for d in fill):  # a required argument missing: the op's error
                return self.op(*args)
            args = args + tuple(fill)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self._function is None:  # no autograd formula: the op's own behaviour (it errs in backward)
                return self.op(*args)
            return self._function.apply(*args)
        return self._body(*args)

    def _eager(self, args: tuple) -> bool:
        """Plain eager mode with plain tensors: the short path is the same function as the op."""
        if self.mutates or torch.compiler.is_compiling() or not _eager_ops_on():
            return False
        if self.triton and set_wrap_triton_enabled is None:  # the body would launch through the tracing wrapper
            return False
        if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
            return False
        return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))

    def _body(self, *args: Any):
        if self.triton:  # as triton_op runs its body for plain tensors: the raw kernels, not the tracing wrapper
            with set_wrap_triton_enabled(False):
                return self.fn(*args)
        return self.fn(*args)

    def _make_function(self) -> type[torch.autograd.Function]:
        op = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = op._body(*args)
                if op.setup is not None:
                    op.setup(ctx, args, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return op.backward(ctx, *grads)

        Eager.__name__ = f"EagerBackwardFor_{self.__name__}"
        return Eager


def triton_op(name: str, *, mutates_args) -> Callable[[Callable], FastOp]:
    """``torch.library.triton_op(name, mutates_args=...)`` with the short eager path (``FastOp``)."""
    def dec(fn: Callable) -> FastOp:
        return FastOp(_library_triton_op(name, fn, mutates_args=mutates_args), fn, bool(mutates_args), triton=True)
    return dec


def custom_op(name: str, *, mutates_args) -> Callable[[Callable], FastOp]:
    """``torch.library.custom_op(name, mutates_args=...)`` with the short eager path (``FastOp``)."""
    def dec(fn: Callable) -> FastOp:
        return FastOp(_library_custom_op(name, fn, mutates_args=mutates_args), fn, bool(mutates_args), triton=False)
    return dec
