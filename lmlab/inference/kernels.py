"""A compiled decode step for CPUs: bandwidth-bound matrix-vector products, one graph per step.

Decoding one token multiplies a single row by every weight matrix. On the CPUs this project runs
on, the BLAS path behind F.linear reads weights at ~10 GB/s for that shape, while a fused
multiply-and-sum compiled by TorchInductor (a vectorised, threaded reduction) reads ~25-30 GB/s,
close to the memory bandwidth. `decode_kernels(model)` routes single-row nn.Linear calls through
that reduction and compiles the model's whole decode step (`Decoder.decode_step`: embedding, RoPE,
mask, layers and, at batch 1, the LM head) as one graph: the KV cache has static shapes and the
step's position is a tensor, so one graph serves every step and the Python between steps is a few
tensor ops. Inductor's C++ wrapper calls the graph's kernels from C++ rather than Python.
Measured at batch 1 on the 56M Llama, interleaved in one process: compiling the layers alone and
running embedding, mask and head outside was 8-10% slower a step (one more set of guards to check,
a dozen small eager ops); the Python wrapper ~5% slower. The first use compiles (~20-60 s;
TorchInductor caches the code on disk for later processes); later calls reuse the compiled step
of the same model.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (I,), weight (O, I) -> (O,). Compiled, it is one fused reduction with no (O, I) temporary."""
    return (weight * x).sum(-1)


def _fast_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() != x.shape[-1] or torch.is_grad_enabled():  # not a single row: the usual path
        return nn.Linear.forward(self, x)
    y = matvec(x.reshape(-1), self.weight)
    if self.bias is not None:
        y = y + self.bias
    return y.view(*x.shape[:-1], -1)


def lm_head(model):
    """The LM head as a function h (B, H) -> logits (B, vocab), with its weight prepared once (per generate call:
    a copy cached on the model went stale, as fused AdamW updates weights in place without bumping `_version`).
    On CPU, oneDNN's linear on a oneDNN copy of the weight runs these few-row products 1.1-2x faster than MKL's
    GEMM (`h @ W_t`; F.linear is slower still); elsewhere, a contiguous transposed copy."""
    w = model.lm_head.weight.detach()
    if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        w_dnn = w.to_mkldnn()
        return lambda h: torch._C._nn.mkldnn_linear(h.float().contiguous().to_mkldnn(), w_dnn).to_dense()
    w_t = w.t().contiguous()  # (H, vocab)
    return lambda h: h @ w_t


@contextlib.contextmanager
def decode_kernels(model: nn.Module, enabled: bool = True):
    """While active, yields step(input_ids, position_ids, cache) -> logits (B, vocab): one decode step of `model`
    (one new token per row, ids and positions (B, 1)) as one compiled graph in which single-row linear layers are
    fused reductions; it writes the cache's next slot and advances cache.length, as model(..., cache=cache) does.
    Yields None when disabled or off the CPU."""
    if not enabled or model.device.type != "cpu":
        yield None
        return
    if getattr(model, "_compiled_decode_step", None) is None:
        model._compiled_decode_step = torch.compile(model.decode_step, options={"cpp_wrapper": True})
    compiled = model._compiled_decode_step

    head = None  # several rows: the LM head outside the graph, on oneDNN (Inductor's GEMM is ~20% slower here)

    def step(input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        nonlocal head
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.length + 1} needed")
        cache.index = torch.arange(cache.length, cache.length + 1, device=input_ids.device)
        cache.visible = cache.max_len
        if input_ids.shape[0] == 1:
            logits = compiled(input_ids, position_ids, cache)  # the head is one more fused reduction
        else:
            head = head or lm_head(model)
            logits = head(compiled(input_ids, position_ids, cache, head=False))
        cache.length += 1
        return logits

    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for m in linears:
        m.forward = types.MethodType(_fast_linear_forward, m)
    try:
        yield step
    finally:
        for m in linears:
            del m.forward  # back to the class's forward
