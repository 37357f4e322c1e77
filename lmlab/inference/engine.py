"""Generation: one prefill over the (left-padded) prompts, then one token per step from a preallocated KV cache.

Only the last position's hidden state goes through the LM head, the largest matrix in the model, multiplied by
a few rows; each generate call prepares the head once (`lm_head`, inference/kernels.py). With compile=True the
decode steps run as one compiled graph (inference/kernels.py).
"""
from __future__ import annotations

from typing import Iterator

import torch

from lmlab.inference.kernels import decode_kernels, lm_head
from lmlab.inference.sampling import SamplingParams, sample


def pad_left(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (B, L) and attention mask (B, L), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p):] = 1
    return ids, mask


def stream_ids(model, prompts: list[list[int]], params: SamplingParams,
               compile: bool = False) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every row (None for rows that already stopped).

    A row stops after emitting one of `params.stop_token_ids` (the stop token is emitted) or after
    max_new_tokens. Rows keep their own positions, so a left-padded row decodes as it would alone.
    compile=True runs decode steps as one compiled graph (see inference/kernels.py): ~2x faster
    at batch 1 on CPU, after a one-time compilation.
    """
    with decode_kernels(model, enabled=compile) as compiled_step:
        yield from _stream(model, prompts, params, compiled_step)


@torch.inference_mode()  # as a decorator it wraps each step of the generator, not the caller's code
def _stream(model, prompts, params, compiled_step=None):
    cfg = model.config
    vocab = cfg.vocab_size
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
    ids, mask = pad_left(prompts)
    B, L = ids.shape
    total = L + params.max_new_tokens
    if cfg.position == "learned" and total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                         f"context of {cfg.max_position_embeddings} positions")
    if params.max_new_tokens == 0:
        return
    device = model.device
    ids, mask = ids.to(device), mask.to(device)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    context = None
    if params.repetition_penalty != 1.0:
        context = torch.full((B, total), -1, dtype=torch.long, device=device)
        context[:, :L] = torch.where(mask.bool(), ids, -1)
    cache = model.new_cache(B, -(-total // 128) * 128)  # a few distinct sizes: few compiled shapes
    pos = mask.sum(dim=1, keepdim=True)  # (B, 1): position of each row's next token
    if compiled_step is not None:  # the last prompt token goes through the compiled step: no head to prepare
        if L > 1:
            model.hidden_states(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        logits = compiled_step(ids[:, -1:], pos - 1, cache)
    else:
        head = lm_head(model)
        logits = head(model.hidden_states(ids, attention_mask=mask, cache=cache)[:, -1])  # (B, vocab)
    stop = set(params.stop_token_ids)
    finished = [False] * B
    for step in range(params.max_new_tokens):
        ctx = context[:, : L + step] if context is not None else None
        tok = sample(logits, params, ctx, gen)  # (B,)
        out = tok.tolist()
        yield [None if f else t for f, t in zip(finished, out)]
        finished = [f or t in stop for f, t in zip(finished, out)]
        if step == params.max_new_tokens - 1 or all(finished):
            return
        if context is not None:
            context[:, L + step] = tok
        if compiled_step is not None:
            logits = compiled_step(tok[:, None], pos, cache)
        else:
            logits = head(model.hidden_states(tok[:, None], position_ids=pos, cache=cache)[:, -1])
        pos = pos + 1


def generate_ids(model, prompts: list[list[int]], params: SamplingParams, compile: bool = False) -> list[list[int]]:
    """New token ids for each prompt (each list ends at its stop token, which is included)."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in stream_ids(model, prompts, params, compile):
        for row, t in zip(outs, step):
            if t is not None:
                row.append(t)
    return outs
