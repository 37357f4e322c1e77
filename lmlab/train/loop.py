"""The one training loop. Every stage (pretrain, finetune, sft, reward, ppo, dpo) is a loss function
plus data plus a call to `train()`; this is the only place that steps an optimizer.

It does: AdamW with decay/no-decay groups, warmup + cosine/linear schedule, gradient accumulation,
clipping, bf16 autocast, optional torch.compile, DDP / FSDP2 under torchrun, periodic eval, a
progress bar, metrics.jsonl, loss plots, atomic checkpoints (keep the last K) and exact resume,
a clean stop on SIGINT/SIGTERM/time budget, and a clear stop on a non-finite loss.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmlab.config import TrainConfig
from lmlab.errors import LmlabError
from lmlab.train import dist


class TrainingError(LmlabError):
    """Training cannot go on (non-finite loss, bad resume state); the message says why and what is kept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine or linear decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms, biases) do not. Fused kernels where the build has them."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # e.g. DTensor parameters without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kw)


# ------------------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_pos": random.getstate()[2], "numpy": list(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2])}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step_*"))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").exists()]  # complete ones only
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: Path, step: int, model, opt, loader, state: dict, keep_last: int,
                    save_model: Callable, tokenizer=None) -> Path:
    """Write checkpoints/step_N atomically: everything goes to a temp dir that is renamed at the end, so
    a crash mid-write leaves the previous checkpoints as they were. Collective under FSDP."""
    model_sd, opt_sd = dist.full_state_dicts(model, opt)
    final = out_dir / "checkpoints" / f"step_{step:06d}"
    if not dist.is_main():
        dist.barrier()
        return final
    tmp = out_dir / "checkpoints" / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model_sd)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(opt_sd, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "loader.json").write_text(json.dumps(loader.state_dict()))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))  # written last
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted((out_dir / "checkpoints").glob("step_*"))[:-keep_last or None]:
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(ckpt: Path, model, opt, loader) -> dict:
    """Restore optimizer, RNG and loader position (the weights are loaded first, by the caller);
    -> trainer state (step, tokens, ...)."""
    opt_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    dist.load_optimizer_state(model, opt, opt_sd)
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    loader.load_state_dict(json.loads((ckpt / "loader.json").read_text()))
    return json.loads((ckpt / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------------------------- logging
class Metrics:
    """metrics.jsonl (one JSON object per line) and loss-curve PNGs; rank 0 only."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        self.main = dist.is_main()
        if self.main and resume_step is not None and self.path.exists():
            # drop lines an interrupted run wrote after its last checkpoint
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif self.main and resume_step is None:
            self.path.write_text("")

    def log(self, **row) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self, out_dir: Path) -> None:
        if not self.main:
            return
        rows = [json.loads(l) for l in self.path.read_text().splitlines() if l]
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        (out_dir / "plots").mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "plots" / "loss.png", dpi=100)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ train
class _StopFlag:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and exit after the current step."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(model, loss_fn: Callable, loader, cfg: TrainConfig, out_dir, *, eval_fn: Callable | None = None,
          save_model: Callable, load_model: Callable, tokenizer=None, resume: bool = False,
          flops_per_token: float | None = None, stop_at: int | None = None, desc: str = "train") -> dict:
    """Train `model` for cfg.max_steps optimizer steps.

    loss_fn(model, batch) -> (loss, {extra metrics}); batch = next(loader), a per-rank micro-batch.
    eval_fn(model) -> {"val_loss": ..., ...}, called every cfg.eval_every steps and at the end.
    save_model(dir, state_dict) / load_model(model, dir) write and read the model part of a checkpoint.
    stop_at: stop after this step as if interrupted (checkpoint saved), e.g. to test resuming.
    Returns a summary: {"step", "loss", "val_loss"..., "seconds", "stopped"}.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "tokens": 0, "seconds": 0.0}
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        print(f"[{desc}] --resume: no checkpoint in {out_dir / 'checkpoints'}; starting from scratch")
    if ckpt is not None:
        load_model(model, ckpt)  # before wrapping: FSDP2 shards the loaded weights
    wrapped = dist.wrap(model, cfg)
    opt = make_optimizer(model, cfg)  # after wrapping: FSDP2 replaces the parameters
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt, loader)
        print(f"[{desc}] resumed from {ckpt} (step {state['step']})")
    metrics = Metrics(out_dir, state["step"] if ckpt is not None else None)
    step_model = wrapped
    if cfg.compile:  # the model and its loss as one graph: the logits' cast and the cross-entropy fuse in too
        loss_fn = torch.compile(loss_fn)
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    if cfg.dtype == "bfloat16" and not dist.fast_bf16(model.device):
        print(f"[{desc}] warning: train.dtype=bfloat16, but this {model.device.type} has no native bf16 matrix "
              "instructions (AVX-512 or AMX): bf16 runs many times slower than float32 here; "
              "train.dtype=float32 is faster")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    peak = dist.peak_flops(cfg.dtype)
    start_time, start_step = time.time() - state["seconds"], state["step"]
    summary = {"stopped": "completed"}

    def checkpoint(step):
        state["seconds"] = time.time() - start_time
        return save_checkpoint(out_dir, step, model, opt, loader, state, cfg.keep_last, save_model, tokenizer)

    def evaluate(step):
        if eval_fn is None:
            return {}
        model.eval()
        with torch.no_grad(), autocast:
            result = eval_fn(model)
        model.train()
        metrics.log(step=step, **result)
        return result

    loss_value = None
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=desc, disable=not dist.is_main(), dynamic_ncols=True)
    model.train()
    with _StopFlag() as stop:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum, extras = torch.zeros((), device=model.device), {}
            for micro in range(cfg.grad_accum):
                batch = next(loader)
                with dist.no_sync(wrapped, micro < cfg.grad_accum - 1), autocast:
                    loss, extra = loss_fn(step_model, batch)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + float(v) / cfg.grad_accum
            loss_value = dist.mean(loss_sum / cfg.grad_accum)
            if not math.isfinite(loss_value):
                last = latest_checkpoint(out_dir)
                raise TrainingError(f"non-finite loss ({loss_value}) at step {step}; stopped without saving. "
                                    f"Last good checkpoint: {last or 'none'}. Try a lower train.lr or "
                                    f"train.grad_clip, or train.dtype=float32.")
            grad_norm = dist.clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip > 0 else float("nan")
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"], state["tokens"] = step + 1, state["tokens"] + tokens_per_step
            dt = time.perf_counter() - t0
            row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_step / dt, **extras}
            if flops_per_token:
                row["mfu"] = flops_per_token * tokens_per_step / dt / (peak * dist.world_size())
            metrics.log(**row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            **({"mfu": f"{row['mfu']:.0%}"} if "mfu" in row else {}))
            done = step + 1 == cfg.max_steps
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
                summary.update(evaluate(step + 1))
            over_time = cfg.max_minutes and (time.time() - start_time) / 60 > cfg.max_minutes
            halt = stop.signal or over_time or (stop_at is not None and step + 1 >= stop_at)
            if dist.any_true(bool(halt)) and not done:  # all ranks stop together
                summary["stopped"] = stop.signal or ("time budget" if over_time else f"stop_at {stop_at}")
                path = checkpoint(step + 1)
                bar.close()
                print(f"[{desc}] stopped ({summary['stopped']}) at step {step + 1}; checkpoint: {path}")
                summary.update(step=step + 1, loss=loss_value, seconds=time.time() - start_time)
                return summary
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not done:
                checkpoint(step + 1)
    bar.close()
    summary.update(evaluate(cfg.max_steps))
    checkpoint(cfg.max_steps)
    metrics.plot(out_dir)
    summary.update(step=cfg.max_steps, loss=loss_value, seconds=time.time() - start_time)
    return summary
