"""CUDA-graph replay of the encoder's forward for fixed clip shapes: one-clip latency on a GPU.

At batch 1 a ViT-B forward is ~200 kernel launches of a few microseconds of work each, so the time is
the host launching them, not the GPU. ``GraphedFrames`` captures ``fn(wave)`` once per (batch, samples)
shape into a ``torch.cuda.CUDAGraph`` and afterwards replays it: one launch for the whole forward.

- Captured: the frontend, the patch grid and the context encoder on equal-length clips (no padding
  mask; ``PatchGrid.positions`` builds those rows on the device, with no host copy or read).
- A graph reads its weights and buffers at fixed addresses and holds the bf16 weight copies made
  when it was captured, so each graph is keyed by ``precision.weights_key`` (every parameter's and
  buffer's identity, storage and version counter) plus the precision: ``load_state_dict``, ``.to()``
  or an in-place change recaptures instead of replaying stale weights.
- The ``most`` most recently used shapes are kept (each holds its own activation memory pool).
- ``first_eager`` (the encoder's ``cuda_graphs="auto"``): a shape is captured the second time it is asked
  for; the first call runs eagerly. A capture runs the forward three times (two warm-ups and the capture),
  so capturing every new shape made a stream of shapes that never repeat (a folder of files of different
  lengths embedded one at a time) do at least three forwards' work per call instead of one (read from the
  code, not timed); now it stays eager, and a shape that repeats pays one eager call before its graph.
- The output is cloned out of the graph's static buffer, so a later replay does not overwrite it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

MODES = ("auto", "on", "off")
AUTO_MAX_BATCH = 8  # "auto": where launches, not arithmetic, dominate a ViT-B forward


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"cuda_graphs must be one of {MODES}, got {mode!r}")
    return mode


class GraphedFrames:
    """``GraphedFrames(most=4)(fn, wave, key)``: ``fn(wave)`` replayed from a CUDA graph captured for
    this wave's shape and ``key`` (anything that changes when what ``fn`` computes with changes).
    A copy (``copy.deepcopy`` of the encoder) starts empty: graphs belong to the module they captured."""

    def __init__(self, most: int = 4, remember: int = 64) -> None:
        self.most, self.remember = most, remember
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.seen: OrderedDict[tuple, None] = OrderedDict()  # asked for once and run eagerly (first_eager)
        self.captures = 0  # how many graphs were captured (tests, benchmarks)

    def __deepcopy__(self, memo) -> "GraphedFrames":
        return GraphedFrames(self.most)

    def _capture(self, fn: Callable[[torch.Tensor], torch.Tensor], wave: torch.Tensor):
        static = wave.clone()
        side = torch.cuda.Stream(device=wave.device)
        side.wait_stream(torch.cuda.current_stream(wave.device))
        with torch.cuda.stream(side):  # warm-up off the capture: cuFFT plans, Triton compiles, bf16 weights
            for _ in range(2):
                fn(static)
        torch.cuda.current_stream(wave.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(static)
        self.captures += 1
        return graph, static, out

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], wave: torch.Tensor, key: tuple,
                 first_eager: bool = False) -> torch.Tensor:
        full_key = (tuple(wave.shape), wave.dtype, wave.device, key)
        # normal tensors whatever the caller's mode: a graph captured under torch.inference_mode would
        # hold inference tensors that a later call outside it may not copy into, and frames returned
        # as inference tensors could not feed a trained head
        with torch.inference_mode(False), torch.no_grad():
            entry = self.graphs.pop(full_key, None)
            if entry is None and first_eager and full_key not in self.seen:
                self.seen[full_key] = None
                while len(self.seen) > self.remember:
                    self.seen.popitem(last=False)
                return fn(wave)
            if entry is None:
                self.seen.pop(full_key, None)
                while len(self.graphs) >= self.most:
                    self.graphs.popitem(last=False)
                entry = self._capture(fn, wave)
            self.graphs[full_key] = entry  # most recent last
            graph, static, out = entry
            static.copy_(wave)
            graph.replay()
            return out.clone()

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
