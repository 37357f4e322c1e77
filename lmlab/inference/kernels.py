"""A compiled decode step for CPUs: bandwidth-bound matrix-vector products, one graph per step.

Decoding one token multiplies a single row by every weight matrix. On the CPUs this project runs
on, the BLAS path behind F.linear reads weights at ~10 GB/s for that shape, while a fused
multiply-and-sum compiled by TorchInductor (a vectorised, threaded reduction) reads ~25 GB/s,
close to the memory bandwidth. `decode_kernels(model)` routes single-row nn.Linear calls through
that reduction and compiles the model's layers for decode steps (the KV cache has static shapes,
so one graph serves every step); `model.compiled_matvec` is the same reduction for the LM head at
batch 1 (~30 GB/s on the (vocab, H) weight as stored, against ~21 GB/s for `h @ W_t`). The first use
compiles (~20-60 s; TorchInductor caches the code on disk for later processes); later calls reuse the
compiled step of the same model.
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


@contextlib.contextmanager
def decode_kernels(model: nn.Module, enabled: bool = True):
    """While active, decode steps (one new token per row) of `model` run as one compiled graph in which
    single-row linear layers are fused reductions. A no-op when disabled or off the CPU."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if not enabled or model.device.type != "cpu":
        yield
        return
    if getattr(model, "_compiled_run_layers", None) is None:
        model._compiled_run_layers = torch.compile(model.run_layers)
        model._compiled_matvec = torch.compile(matvec)
    for m in linears:
        m.forward = types.MethodType(_fast_linear_forward, m)
    model.compiled_step, model.compiled_matvec = model._compiled_run_layers, model._compiled_matvec
    try:
        yield
    finally:
        model.compiled_step = model.compiled_matvec = None
        for m in linears:
            del m.forward  # back to the class's forward
