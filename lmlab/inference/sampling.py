"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

The order is transformers' (penalty -> temperature -> top-k -> top-p -> sample), so the same seed
and settings pick from the same distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the context
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); context (B, L) token ids seen so far (prompt + generated; padding = -1)."""
    if penalty == 1.0:
        return logits
    ctx = context.clamp(min=0)
    seen = torch.gather(logits, 1, ctx)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    keep = torch.gather(logits, 1, ctx)  # padding positions write back their own value
    return logits.scatter(1, ctx, torch.where(context >= 0, seen, keep))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. logits (B, V), already temperature-scaled."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p  # the low-probability tail whose mass is <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, context: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
