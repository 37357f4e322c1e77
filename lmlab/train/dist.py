"""Distributed helpers for the training loop: one process by default; DDP or FSDP2 under torchrun
(gloo on CPU, NCCL on GPU). Every function is a no-op (or the obvious local answer) on one process."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as td

_PEAK: dict[str, float] = {}


def init() -> None:
    """Join the process group torchrun describes in the environment (once)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        import atexit
        atexit.register(_shutdown)  # leave the group before exit: gloo's threads can abort a teardown otherwise


def _shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def world_size() -> int:
    return td.get_world_size() if active() else 1


def rank() -> int:
    return td.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        td.barrier()


def total(x: torch.Tensor) -> float:
    """Sum a scalar over ranks."""
    if active():
        x = x.detach().clone()
        td.all_reduce(x, op=td.ReduceOp.SUM)
    return float(x)


def mean(x: torch.Tensor) -> float:
    """Average a scalar over ranks (for logging)."""
    return total(x) / world_size()


def any_true(flag: bool) -> bool:
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def is_fsdp(model) -> bool:
    return getattr(model, "_lmlab_fsdp", False)


def wrap(model, cfg):
    """DDP or FSDP2 (fully_shard on every block, then the root) under torchrun; the model itself otherwise.
    FSDP2 shards the parameters in place, so the optimizer must be made after wrapping."""
    if not active():
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        model._lmlab_fsdp = True
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model)


def no_sync(wrapped, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if not skip or not active():
        return nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        return _ResyncFSDP(wrapped)
    return nullcontext()


class _ResyncFSDP:
    def __init__(self, m):
        self.m = m

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.m.set_requires_gradient_sync(True)


def clip_grad_norm(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def full_model_state(model):
    """The complete model state dict under FSDP2 (collective; on CPU); None when the model's own
    parameters are already complete (save the model directly)."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _param_names(model) -> list[str]:
    """Parameter names in the optimizer's order (make_optimizer: matrices, then vectors; tied once)."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    return [n for n, p in params if p.dim() >= 2] + [n for n, p in params if p.dim() < 2]


def _optim_by_name(model, sd: dict) -> dict:
    """torch's optimizer state (keyed by parameter index) -> keyed by parameter name, as FSDP2 writes it,
    so a checkpoint resumes on any number of processes, sharded or not."""
    names = _param_names(model)
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]}


def _optim_by_index(model, sd: dict) -> dict:
    index = {n: i for i, n in enumerate(_param_names(model))}
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in sd["param_groups"]]}


def full_state_dicts(model, opt):
    """(model state as full_model_state gives it, complete optimizer state keyed by parameter name).
    Collective under FSDP2."""
    if not is_fsdp(model):
        return None, _optim_by_name(model, opt.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state(model), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer_state(model, opt, state: dict) -> None:
    if not is_fsdp(model):
        opt.load_state_dict(_optim_by_index(model, state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def fast_bf16(device: str | torch.device | None = None) -> bool:
    """Whether `device` (default: the one training uses) multiplies bf16 matrices natively: a CUDA GPU with bf16,
    or a CPU that oneDNN's bf16 kernels run on (AVX-512 or AMX on x86). Elsewhere PyTorch's CPU bf16 matmul is
    scalar code: 1 GFLOP/s against 84 in fp32 on an AVX2-only EPYC, which makes bf16 autocast ~50x slower."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def peak_flops(dtype: str) -> float:
    """This machine's matmul FLOP/s in the training dtype, measured once per process (for MFU)."""
    if dtype not in _PEAK:
        dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        # emulated bf16 (no fast_bf16) takes ~2 s per 1024^3 product: a smaller one tells the same
        n = 4096 if dev == "cuda" else 1024 if dt == torch.float32 or fast_bf16(dev) else 256
        a, b = torch.randn(n, n, dtype=dt, device=dev), torch.randn(n, n, dtype=dt, device=dev)
        for _ in range(2):
            a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best, runs, start = float("inf"), 0, time.perf_counter()
        # the fastest of at least 5 runs and 0.3 s: a moment of load at start (one run here is ~5 ms) must not
        # lower the peak for the whole run (a speedrun once showed an MFU of 110% from a peak measured at half)
        while runs < 5 or time.perf_counter() - start < 0.3:
            t0 = time.perf_counter()
            a @ b
            if dev == "cuda":
                torch.cuda.synchronize()
            best, runs = min(best, time.perf_counter() - t0), runs + 1
        _PEAK[dtype] = 2 * n ** 3 / best
    return _PEAK[dtype]


def micro_batch(t) -> int:
    """Sequences per forward pass on this rank: train.batch_size (global) / (ranks x train.grad_accum)."""
    from lmlab.config import ConfigError

    W = world_size()
    if t.batch_size % (W * t.grad_accum):
        raise ConfigError(f"train.batch_size ({t.batch_size}) must divide into {W} ranks x train.grad_accum "
                          f"({t.grad_accum}) micro-batches")
    return t.batch_size // (W * t.grad_accum)
