"""Sampling with the UNet replayed from CUDA graphs: a preview's 25 denoising steps stop waiting on Python.

An eager SD1.5 UNet call launches hundreds of small kernels and on an H100 spends most of its time in
the host (bench/RESULTS.md). `graphed(unet)` replaces the module's forward, for the length of a `with`
block, by one that captures a graph per input shape and adapter state and replays it. The graph reads
the weights where they live, so LoRA weights trained in place between previews are seen (and so are the
working copies previews compute with, refreshed before each preview); a change of storage (a `.to()`,
channels-last), of any adapter multiplier or of the working copy gives a new key and a new capture.
Calls the graph cannot stand for (training mode, extra arguments) run eagerly. With `compiled` the
graphs are captured from a torch.compile of the forward (about a minute to compile SD1.5 on first use;
then about a third less time per preview, bench/RESULTS.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .lora import LoRAModule

log = logging.getLogger(__name__)

MAX_GRAPHS = 4  # per UNet: shapes x adapter states kept; the least recently used is dropped


def _per_image_key(m: LoRAModule) -> tuple | None:
    """A batched preview's per-image multipliers: the graph reads them at this address."""
    return None if m.per_image is None else (m.per_image.data_ptr(), m.per_image.shape)


class GraphedUNet:
    """Graph cache of one UNet's inference forward."""

    def __init__(self, unet: torch.nn.Module, compiled: bool = False) -> None:
        self.unet = unet
        self.compiled = torch.compile(type(unet).forward, dynamic=False) if compiled else None
        self.compile_failed = False
        self.adapters = [m for m in unet.modules() if isinstance(m, LoRAModule)]
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = OrderedDict()
        self.pool = None

    def _eager(self, *args, **kwargs):
        return type(self.unet).forward(self.unet, *args, **kwargs)

    def _recorder(self, layout: tuple):
        """The forward a graph records: compiled if asked for, else eager. Compiled code assumes the
        weights' strides it was made for and its guards (torch 2.11) do not check them, so after a change
        of storage (channels-last) graphs are recorded eagerly. The layout is kept on the UNet: compiled
        code outlives this object."""
        if self.compiled is None or self.compile_failed:
            return self._eager
        if self.unet.__dict__.setdefault("_sampling_compiled_layout", layout) != layout:
            log.warning("the UNet's weights moved since the sampling UNet was compiled: sampling runs uncompiled")
            return self._eager
        return lambda *args, **kwargs: self.compiled(self.unet, *args, **kwargs)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                added_cond_kwargs: dict | None = None, return_dict: bool = True, **extra):
        if self.unet.training or any(v is not None for v in extra.values()) or sample.device.type != "cuda":
            return self._eager(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                               return_dict=return_dict, **extra)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        names = sorted(added_cond_kwargs or {})
        inputs = [sample, timestep.to(sample.device), encoder_hidden_states, *(added_cond_kwargs[n] for n in names)]
        key = (tuple((x.shape, x.dtype) for x in inputs), tuple(names),
               tuple((m.multiplier, m.merged, _per_image_key(m), m.work and tuple(w.data_ptr() for w in m.work))
                     for m in self.adapters),
               tuple((p.data_ptr(), p.shape) for p in self.unet.parameters()))
        if key not in self.graphs:
            self._capture(key, inputs, names)
        self.graphs.move_to_end(key)
        graph, static, out = self.graphs[key]
        for buf, x in zip(static, inputs, strict=True):
            buf.copy_(x)
        graph.replay()
        result = out.clone()
        return (result,) if not return_dict else UNet2DConditionOutput(sample=result)

    def _capture(self, key: tuple, inputs: list[torch.Tensor], names: list[str]) -> None:
        static = [x.clone() for x in inputs]
        forward = self._recorder(key[-1])

        def run() -> torch.Tensor:
            added = dict(zip(names, static[3:], strict=True)) or None
            return forward(static[0], static[1], static[2], added_cond_kwargs=added, return_dict=False)[0]

        log.info("capturing the sampling UNet for %s%s", tuple(inputs[0].shape),
                 " (compiling it first: about a minute)" if forward is not self._eager else "")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            try:
                run()  # warm-up (and compile): cuDNN/cuBLAS choices and allocations happen outside the capture
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # a failed compile must not end a training run: record the eager forward
                if forward is self._eager:
                    raise
                log.warning("compiling the sampling UNet failed, sampling runs uncompiled: %s", e)
                self.compile_failed, forward = True, self._eager
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = run()
        self.pool = graph.pool()
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.graphs[key] = (graph, static, out)


@contextmanager
def graphed(unet: torch.nn.Module, compiled: bool = False) -> Iterator[None]:
    """Within the block, `unet(...)` replays CUDA graphs (kept across blocks for the same UNet), recorded
    from a compiled forward if `compiled`."""
    g = unet.__dict__.get("_graphed_sampling")
    adapters = {id(m) for m in unet.modules() if isinstance(m, LoRAModule)}
    if g is None or {id(m) for m in g.adapters} != adapters or (g.compiled is not None) != compiled:
        g = GraphedUNet(unet, compiled)  # first use, adapters injected or removed, or compiling switched
        unet.__dict__["_graphed_sampling"] = g
    unet.forward = g.forward
    try:
        yield
    finally:
        del unet.forward
