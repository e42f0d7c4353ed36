"""The training step without host reads: fp32 targets under autocast, the fused optimizer (and its
device-side skip of non-finite steps), one graph for torch.compile whatever the mask size, and, on a
GPU, a step under CUDA's sync debug mode."""
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bestrq2 import BestRQ2, BestRQ2Config
from bestrq2.train import TrainConfig, make_optimizer, train_step


def tiny(**kw):
    return BestRQ2Config.preset("tiny", encoder_depth=1, predictor_depth=1, codebook_size=512, **kw)


def test_targets_and_spectrogram_stay_float32_under_bf16_autocast():
    """Under autocast the frontend's matmul would run in bf16 and move codes near a tie; it must not."""
    model = BestRQ2(tiny())
    wave = torch.randn(2, 48_000) * 0.1
    mask = torch.zeros(32, dtype=torch.bool)
    mask[torch.randperm(32)[:14]] = True
    ref_spec = model.frontend(wave)
    ref_codes = model.targets(wave)[:, mask]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spec = model.frontend(wave)
        out = model(wave, mask=mask)
        assert torch.matmul(wave[:, :64], wave[:, :64].T).dtype == torch.bfloat16  # autocast is on
    assert spec.dtype == torch.float32 and torch.equal(spec, ref_spec)
    assert torch.equal(out.targets, ref_codes)


def _batches(n, b=2, t=48_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, t, generator=g) * 0.1, torch.full((b,), t)) for _ in range(n)]


def test_fused_and_foreach_adamw_agree():
    """Five steps on the same gradients (the model's shapes; well above Adam's eps: a model's key biases,
    whose true gradient is zero, get rounding noise that Adam amplifies differently on either path)."""
    shapes = [p.shape for p in BestRQ2(tiny()).parameters()]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(5)]
    result = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, fused=fused, foreach=not fused)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        result[fused] = params
    for a, b in zip(result[True], result[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(result[True][0], init[0])
    opt = make_optimizer(BestRQ2(tiny()).parameters(), TrainConfig(), torch.device("cpu"))
    assert opt.defaults["fused"] and not opt.defaults["foreach"]  # fused on a CPU too (5x foreach's speed)


def test_resumed_optimizer_steps_the_way_this_machine_builds_it():
    """A checkpoint's optimizer state carries its groups' fused / foreach flags (a run saved when AdamW was foreach
    on a CPU): after loading, keep_step_kind puts back this machine's choice, so train_step's skip of a non-finite
    step (found_inf, fused only) matches the step that runs; the moments load unchanged."""
    from bestrq2.train import keep_step_kind

    model = BestRQ2(tiny())
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    opt = make_optimizer(model.parameters(), TrainConfig(), torch.device("cpu"))
    opt.load_state_dict(old.state_dict())
    assert not opt.param_groups[0]["fused"]  # what loading alone leaves
    keep_step_kind(opt)
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    first = next(iter(opt.state.values()))
    torch.testing.assert_close(first["exp_avg"], next(iter(old.state.values()))["exp_avg"])


def test_non_finite_step_is_skipped_on_the_device(monkeypatch):
    """With a fused optimizer the skip needs no host read: found_inf leaves weights, moments and step
    counts as they were; the next finite step updates again."""
    torch.manual_seed(0)
    model = BestRQ2(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    (wave, lengths), = _batches(1)
    mask = model.prepare(wave).plan.mask
    tc = TrainConfig(batch_size=2)
    train_step(model, model, model, opt, tc, wave, lengths, mask, torch.device("cpu"), 1, False)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    steps = [s["step"].clone() for s in opt.state.values()]
    real = BestRQ2.forward_batch

    def poisoned(self, batch):
        out = real(self, batch)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BestRQ2, "forward_batch", poisoned)
    stats = train_step(model, model, model, opt, tc, wave, lengths, mask, torch.device("cpu"), 1, False)
    assert torch.isnan(stats[0]) and float(opt.found_inf) == 1.0
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert [s["step"] for s in opt.state.values()] == steps
    monkeypatch.setattr(BestRQ2, "forward_batch", real)
    train_step(model, model, model, opt, tc, wave, lengths, mask, torch.device("cpu"), 1, False)
    assert not torch.equal(model.head.weight, before["head.weight"])


@pytest.mark.parametrize("one_stage", [False, True])
def test_device_side_of_a_step_is_one_graph(one_stage, monkeypatch):
    """torch._dynamo.explain: no graph break in forward_batch (grid -> targets -> context -> predict ->
    loss); fullgraph compile (aot_eager: forward and backward traced) runs and matches eager."""
    # aot tracing runs Triton kernels on fake tensors, which the CPU interpreter cannot: the Triton
    # path's compiled step runs in the GPU suite (test_gpu) and, with its kernels recorded instead of run,
    # in test_gpu_compile (``bench.gpu_compile --trace-step``); here the reference ops ("auto" on CPU
    # tensors, whatever BESTRQ2_KERNELS the suite runs under)
    monkeypatch.delenv("BESTRQ2_KERNELS", raising=False)
    torch.manual_seed(0)
    model = BestRQ2(tiny(one_stage=one_stage, encoder_drop_path=0.0))
    wave = torch.randn(2, 48_000) * 0.1
    batch = model.prepare(wave)
    explain = torch._dynamo.explain(model.forward_batch)(batch)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_batch, fullgraph=True, backend="aot_eager")
    out, ref = compiled(batch), model.forward_batch(batch)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert model.head.weight.grad is not None


def test_mask_sizes_do_not_recompile():
    """U[0.4, 0.6] of 128 tokens gives 26 mask sizes; the index tensors are marked dynamic, so one
    compiled graph serves them all (counted here over 5 sizes, 3 s clips: 32 tokens)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BestRQ2(tiny(encoder_drop_path=0.0))
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model.forward_batch, backend=counter)
    wave = torch.randn(2, 48_000) * 0.1
    for m in (10, 13, 15, 17, 19):
        mask = torch.zeros(32, dtype=torch.bool)
        mask[torch.randperm(32)[:m]] = True
        out = compiled(model.prepare(wave, mask=mask))
        assert out.targets.shape[1] == m
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 5 mask sizes"


@pytest.mark.cuda
def test_step_reads_nothing_back_on_cuda():
    """A whole training step (prepare from pinned host tensors, forward, backward, fused AdamW with
    found_inf) under torch.cuda.set_sync_debug_mode('error')."""
    dev = torch.device("cuda")
    model = BestRQ2(tiny()).to(dev)
    opt = make_optimizer(model.parameters(), TrainConfig(lr=1e-3), dev)
    (wave, lengths), = _batches(1)
    wave, lengths = wave.pin_memory(), lengths
    mask = model.prepare(wave).plan.mask
    tc = TrainConfig(batch_size=2)
    train_step(model, model, model, opt, tc, wave, lengths, mask, dev, 1, False)  # warm-up: lazy inits
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = train_step(model, model, model, opt, tc, wave, lengths, mask, dev, 1, False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(stats[0]).item()


def test_drop_path_folded_into_the_residual_add():
    """x + drop(branch) in one addcmul: each sample keeps its whole branch scaled by 1 / keep or drops it
    (about p of them), packed tokens drop per clip, eval mode adds the branch as it is."""
    from bestrq2.transformer import DropPath

    d = DropPath(0.25).train()
    x, b = torch.randn(4000, 3, 8), torch.randn(4000, 3, 8, requires_grad=True)
    out = d.add(x, b)
    dropped = (out - x).reshape(4000, -1).abs().amax(1) < 1e-6  # per sample: the branch is gone, or ...
    factor = torch.where(dropped, 0.0, 1 / 0.75)[:, None, None]
    torch.testing.assert_close(out, x + b.detach() * factor)  # ... all of it is there, scaled by 1 / keep
    assert abs(float(dropped.float().mean()) - 0.25) < 0.03
    out.sum().backward()
    torch.testing.assert_close(b.grad, factor.expand_as(b))
    sample_of = torch.tensor([0, 0, 0, 1, 1, 2])
    xp, bp = torch.randn(6, 8), torch.randn(6, 8)
    for _ in range(20):  # every clip's tokens share one draw
        gone = (d.add(xp, bp, sample_of) - xp).abs().amax(1) < 1e-6
        assert len(set(gone[:3].tolist())) == 1 and len(set(gone[3:5].tolist())) == 1
    d.eval()
    assert torch.equal(d.add(x, b.detach()), x + b.detach())


@pytest.mark.cuda
def test_mask_sizes_do_not_recompile_on_cuda():
    """The real fast path (Triton ops, the fused head as an opaque custom op, bf16 autocast): one
    compilation for 5 mask sizes, and the compiled loss equals eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = BestRQ2(tiny(encoder_drop_path=0.0)).to(dev)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model.forward_batch, backend=counter)
    wave = (torch.randn(2, 48_000) * 0.1).pin_memory()
    for m in (10, 13, 15, 17, 19):
        mask = torch.zeros(32, dtype=torch.bool)
        mask[torch.randperm(32)[:m]] = True
        batch = model.prepare(wave, mask=mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, ref = compiled(batch), model.forward_batch(batch)
        torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 5 mask sizes"


@pytest.mark.cuda
def test_triton_ops_short_eager_path_on_cuda():
    """The Triton ops' short eager path (kernels._op.FastOp: raw launches, no dispatcher) on the card: a step's loss
    and gradients as through the torch.library dispatcher (BESTRQ2_EAGER_OPS=0), the same kernels either way."""
    from bestrq2.env import overridden

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = BestRQ2(tiny()).to(dev)
    wave = (torch.randn(2, 48_000) * 0.1).pin_memory()
    mask = torch.zeros(32, dtype=torch.bool)
    mask[torch.randperm(32)[:15]] = True
    runs = []
    for eager in ("1", "0"):
        model.zero_grad(set_to_none=True)
        with overridden("BESTRQ2_EAGER_OPS", eager):
            torch.manual_seed(1)  # the drop-path draws
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model.forward_batch(model.prepare(wave, mask=mask))
            out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss1, g1), (loss0, g0) = runs
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_copy_to_device_off_cuda_is_a_plain_copy():
    from bestrq2.inputs import copy_to_device

    x = torch.randn(3, 4)
    out = copy_to_device([x, None, torch.arange(3)], "cpu")
    assert out[0] is x and out[1] is None and torch.equal(out[2], torch.arange(3))


@pytest.mark.cuda
def test_step_inputs_are_copied_beside_the_compute_stream():
    """copy_to_device on CUDA: the copies run on a side stream while the compute stream is busy (they finish
    before the matmuls queued ahead of them), kernels queued afterwards on the compute stream see the data,
    pageable sources are pinned first, and the host never waits."""
    from bestrq2.inputs import _COPY_STREAMS, copy_to_device

    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev)
    pcm = torch.randint(-32768, 32767, (64, 160_000), dtype=torch.int16).pin_memory()
    idx = torch.randperm(128)[None].repeat(64, 1)  # pageable
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mm_done = torch.cuda.Event()
        for _ in range(3):
            a = a @ a / 8192 ** 0.5  # tens of ms of work queued on the compute stream
        mm_done.record()
        w, none, i = copy_to_device([pcm, None, idx], dev)
        copied = torch.cuda.Event()
        copied.record(_COPY_STREAMS[dev.index])
        y = w.float() * 2 + i.sum()  # queued on the compute stream after the copies
    finally:
        torch.cuda.set_sync_debug_mode(0)
    copied.synchronize()
    assert not mm_done.query(), "the copy waited for the kernels queued before it"
    assert none is None and torch.equal(w.cpu(), pcm) and torch.equal(i.cpu(), idx)
    torch.testing.assert_close(y.cpu(), pcm.float() * 2 + idx.sum().float(), rtol=0, atol=0)


HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu}


class ProjectCallWatch(TorchFunctionMode):
    """Records the torch calls made from the project's own code (bestrq2/, kernels/; not torch's, such as
    torch.optim's CPU step counters) that ``flag(func, kwargs, path)`` names (it returns a label or None)."""

    def __init__(self, flag):
        super().__init__()
        self.flag, self.seen = flag, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        code = sys._getframe(1).f_code
        if any(f"{os.sep}{pkg}{os.sep}" in code.co_filename for pkg in ("bestrq2", "kernels")):
            what = self.flag(func, kwargs, code.co_filename)
            if what:
                self.seen.append(f"{what} in {code.co_filename}:{code.co_name}")
        return func(*args, **kwargs)


def test_step_makes_no_tensor_from_host_values_on_the_device():
    """``torch.tensor(x, device=d)`` (or ``as_tensor``) copies from pageable memory and, on CUDA, waits for the
    whole queue: a host sync a step that only a GPU shows (the stop flag was made so). Every call of a
    training step is watched on this CPU: none may build a tensor from host values with a device."""
    def flag(func, kwargs, path):
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            return f"{func.__name__}(..., device={kwargs['device']})"
        if func in HOST_READS and path.endswith(f"{os.sep}bestrq2{os.sep}train.py"):  # the step's own code
            return func.__name__
        return None

    dev = torch.device("cpu")
    model = BestRQ2(tiny())
    # fused, as on CUDA: train_step then takes the device-side skip (found_inf), the path a GPU runs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    (wave, lengths), = _batches(1)
    mask = model.prepare(wave).plan.mask
    with ProjectCallWatch(flag) as w:
        stats = train_step(model, model, model, opt, TrainConfig(batch_size=2), wave, lengths, mask, dev, 1, True)
    assert w.seen == [] and float(stats[2]) == 1.0  # the stop flag still arrives


def test_packed_drop_path_reads_no_value_back():
    """Packed (ragged) blocks in training draw each add's drop-path factors for the clip count taken from
    cu_seqlens' shape: no read of sample_of's values (it was ``int(sample_of.max())`` per add, a device sync
    each on CUDA: 22 a ViT-B forward with per-sample ragged masks)."""
    import torch.nn.functional as F

    from bestrq2.transformer import Block

    blk = Block(16, 2, drop_path=0.3).train()
    lengths = torch.tensor([5, 3, 4])
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    sample_of = torch.repeat_interleave(torch.arange(3), lengths)
    x = torch.randn(12, 16)

    def flag(func, kwargs, path):
        return func.__name__ if func in HOST_READS and path.endswith(f"{os.sep}transformer.py") else None

    for normed in (None, blk.norm1(x)):  # the plain block and the fused form (the Triton path's)
        with ProjectCallWatch(flag) as w:
            out = blk(x, None, "triton", (cu, 5), sample_of, normed=normed, next_norm=blk.norm1)
        assert w.seen == [], w.seen
        assert (out[0] if isinstance(out, tuple) else out).shape == x.shape


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_device_side_of_the_gpu_step_reads_no_value_back(attention, monkeypatch):
    """The GPU path's device side (every op on its Triton kernel, interpreted here; bf16 autocast; forward,
    backward, fused optimizer arguments) under a watch for value reads in the project's code: item, tolist,
    bool / float / int of a tensor, numpy, cpu. On CUDA each is a host sync; on this CPU only this watch
    sees them. (``prepare``, the host side, reads its host tensors by design and is outside the watch.)"""
    from bestrq2.config import OPS

    monkeypatch.setenv("BESTRQ2_CHECK", "0")  # what CUDA tensors get by default (kernels._dispatch.checking)
    model = BestRQ2(tiny(kernels={op: "triton" for op in OPS if op != "attention"} | {"attention": attention}))
    (wave, lengths), = _batches(1)
    batch = model.prepare(wave, lengths)
    reads = ProjectCallWatch(lambda func, kwargs, path: func.__name__ if func in HOST_READS else None)
    with reads as w, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_batch(batch)
        out.loss.backward()
    assert w.seen == [], "\n".join(sorted(set(w.seen)))
    assert torch.isfinite(out.loss).all() and all(p.grad is not None for p in model.encoder.parameters())
