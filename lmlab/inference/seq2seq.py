"""Generation for encoder-decoder models (T5, BART): encode the prompts once, then decode one token per step
from a KV cache, starting at decoder_start_token_id. Greedy and sampling pick tokens with
lmlab.inference.sampling; beam search follows transformers' `generate(num_beams=k, do_sample=False)` step for
step (its candidate selection, length penalty and stopping rule), so both return the same sequences. The
config's forced_bos_token_id / forced_eos_token_id (BART) force the first new token / the one that reaches
max_new_tokens, as transformers' ForcedBOS/ForcedEOS logits processors do.
"""
from __future__ import annotations

import torch

from lmlab.inference.sampling import SamplingParams, apply_repetition_penalty, sample


def pad_right(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder inputs (B, S) and attention mask (B, S), padded on the right (where BART's absolute positions need
    the padding; T5's relative positions make the side irrelevant)."""
    from lmlab.data.objectives import pad_with_mask

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    return pad_with_mask(prompts, pad_id)


def generate_seq2seq(model, prompts: list[list[int]], max_new_tokens: int = 64, num_beams: int = 1,
                     temperature: float = 0.0, stop_token_ids: list[int] | None = None, length_penalty: float = 1.0,
                     early_stopping: bool | str = False, **sampling) -> list[list[int]]:
    """New decoder tokens for each prompt (the decoder start token is not included; a row ends at its stop token,
    which is included). stop_token_ids defaults to the config's eos ids.

    num_beams > 1: beam search (deterministic: temperature must be 0). Its score is the summed log-probability
    divided by length ** length_penalty; early_stopping is transformers' (False: stop a prompt once no running beam
    can beat its k finished ones at the current length; True: once k are finished; "never": at the best length).
    Other keyword arguments (top_k, top_p, repetition_penalty, seed) are SamplingParams'.
    """
    cfg = model.config
    if stop_token_ids is None:
        stop_token_ids = list(cfg.eos_ids)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_token_ids=list(stop_token_ids), **sampling)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search is deterministic here: use temperature=0 with num_beams > 1")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if cfg.decoder_start_token_id is None:
        raise ValueError("model config: decoder_start_token_id is not set")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
    ids, mask = pad_right(prompts, cfg.pad_token_id or 0)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    with torch.inference_mode():
        ids, mask = ids.to(model.device), mask.to(model.device)
        enc = model.encode(ids, mask)  # (B, S, H)
        if num_beams == 1:
            return _sample(model, enc, mask, params)
        return _beam_search(model, enc, mask, params, num_beams, length_penalty, early_stopping)


def forced_token(cfg, step: int, n: int) -> int | None:
    """The token transformers' generate forces at 0-based step `step` of n: forced_eos_token_id at the last step
    (ForcedEOS runs after ForcedBOS, so it wins when n == 1), forced_bos_token_id at the first; else None."""
    if step == n - 1 and cfg.forced_eos_token_id is not None:
        return cfg.forced_eos_token_id
    if step == 0 and cfg.forced_bos_token_id is not None:
        return cfg.forced_bos_token_id
    return None


def _sample(model, enc, mask, params: SamplingParams) -> list[list[int]]:
    B, n = enc.shape[0], params.max_new_tokens
    device = enc.device
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    # decoder tokens so far, the start token first (transformers' repetition penalty sees it too); -1 = not yet
    seqs = torch.full((B, n + 1), -1, dtype=torch.long, device=device)
    seqs[:, 0] = model.config.decoder_start_token_id
    cache = model.new_cache(B, n)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    outs: list[list[int]] = [[] for _ in range(B)]
    for step in range(n):
        logits = model.decode(seqs[:, step: step + 1], enc, mask, cache)[:, -1]  # (B, V)
        ctx = seqs[:, : step + 1] if params.repetition_penalty != 1.0 else None
        tok = sample(logits, params, ctx, gen)  # (B,)
        if (forced := forced_token(model.config, step, n)) is not None:
            tok = torch.full_like(tok, forced)
        for row, t, f in zip(outs, tok.tolist(), finished.tolist()):
            if not f:
                row.append(t)
        seqs[:, step + 1] = tok
        finished |= torch.isin(tok, stop)
        if bool(finished.all()):
            break
    return outs


def _beam_search(model, enc, mask, params: SamplingParams, k: int, length_penalty: float,
                 early_stopping: bool | str) -> list[list[int]]:
    """Each prompt keeps k running hypotheses and up to k finished ones (those that emitted a stop token, or ran
    to max_new_tokens). A step ranks the 2k best continuations of all running beams by summed log-probability:
    among the best k of them, those that stop join the finished list (score / length ** length_penalty); the best
    k that do not stop run on. All scores are float32, as in transformers, so ties break the same way."""
    B, n = enc.shape[0], params.max_new_tokens
    device, V = enc.device, model.config.vocab_size
    stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    n_keep = max(2, 1 + len(stop)) * k  # enough candidates to leave k running even if the best ones all stop
    enc, mask = enc.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)  # (B*k, S, H), (B*k, S)
    cache = model.new_cache(B * k, n)
    seqs = torch.full((B, k, n + 1), -1, dtype=torch.long, device=device)  # start token + tokens so far
    seqs[:, :, 0] = model.config.decoder_start_token_id
    scores = torch.zeros(B, k, device=device)  # summed log-probabilities of the running beams
    scores[:, 1:] = -1e9  # at first all beams are the same: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (score, tokens), best first
    done = [False] * B
    rows = torch.arange(B, device=device)[:, None] * k  # (B, 1): first cache row of each prompt
    for step in range(n):
        logits = model.decode(seqs[:, :, step].reshape(B * k, 1), enc, mask, cache)[:, -1].float()  # (B*k, V)
        logp = logits.log_softmax(dim=-1)
        if params.repetition_penalty != 1.0:
            logp = apply_repetition_penalty(logp, seqs[:, :, : step + 1].reshape(B * k, -1), params.repetition_penalty)
        if (forced := forced_token(model.config, step, n)) is not None:  # log-probability 0, the rest -inf
            logp = torch.full_like(logp, float("-inf")).index_fill_(1, torch.tensor([forced], device=device), 0.0)
        total = (logp.view(B, k, V) + scores[:, :, None]).view(B, k * V)
        top, idx = total.topk(n_keep, dim=-1)  # (B, n_keep), best first
        beam, token = idx // V, idx % V
        stops = torch.isin(token, stop) | (step == n - 1)  # (B, n_keep); the last step ends every beam
        normed = (top / (step + 1) ** length_penalty).tolist()  # float32 values, as transformers compares them
        for b in range(B):
            if done[b]:
                continue
            for j in range(k):  # only the best k candidates may finish
                if stops[b, j]:
                    hyp = seqs[b, beam[b, j], 1: step + 1].tolist() + [int(token[b, j])]
                    finished[b].append((normed[b][j], hyp))
            finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:k]
        # the best k candidates that go on
        running = top - stops.float() * 1e9
        scores, keep = running.topk(k, dim=-1)  # (B, k)
        src = beam.gather(1, keep)  # (B, k): the beam each new hypothesis extends
        seqs = seqs.gather(1, src[:, :, None].expand_as(seqs))
        seqs[:, :, step + 1] = token.gather(1, keep)
        cache.reorder((src + rows).view(-1))
        # a prompt is done when its k finished hypotheses cannot be beaten (transformers' heuristic)
        best_len = n if early_stopping == "never" and length_penalty > 0 else step + 1
        best_running = (scores[:, 0] / best_len ** length_penalty).tolist()
        for b in range(B):
            if not done[b] and len(finished[b]) == k:
                done[b] = early_stopping is True or best_running[b] <= finished[b][-1][0]
        if all(done):
            break
    return [f[0][1] for f in finished]
