"""Continuous batching: one thread decodes every running request together, admitting new ones between steps.

    engine = Engine(model, max_batch=32)
    req = engine.submit(prompt_ids, SamplingParams(...), on_token)   # on_token(token_id or None=finished)
    req.cancel()                                                     # a client went away: its slot frees

The KV cache has `max_batch` rows on one shared timeline of `max_len` slots. Running requests occupy rows
0..n-1 (a finished request's row is refilled by the last one, so a decode step reads n rows, not
max_batch). A new request is prefilled on its own (batch 1) and its keys/values copied into a free row so
that its prompt ends where the timeline is; `key_mask` hides every slot a row does not own (the others'
older tokens, gaps), and each row carries its own position ids, so a request decodes exactly as it would
alone. When the timeline is full, rows are compacted to the right (their real slots kept in order).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmlab.inference.sampling import SamplingParams, sample
from lmlab.models.layers import KVCache


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (the server answers 429)."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[int | None, str | None], None]  # (token, None) per token; (None, finish reason) at the end
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    position: int = 0  # position id of the request's next input token

    def cancel(self) -> None:
        self.cancelled = True


def _rows(cache: KVCache, n: int) -> KVCache:
    """A KVCache over the first n rows of `cache` (views: writes go to `cache`)."""
    view = object.__new__(KVCache)
    view.k, view.v = [k[:n] for k in cache.k], [v[:n] for v in cache.v]
    view.key_mask, view.has_padding = cache.key_mask[:n], True
    view.length, view.max_len, view.index, view.visible = cache.length, cache.max_len, None, 0
    return view


class Engine:
    def __init__(self, model, max_batch: int = 32, max_len: int | None = None, max_waiting: int = 256):
        self.model, self.max_batch, self.max_waiting = model, max_batch, max_waiting
        self.max_len = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.cache = model.new_cache(max_batch, self.max_len)
        self.cache.has_padding = True
        self.head = model.lm_head.weight.detach().t().contiguous()  # (H, vocab), see inference/engine.py
        self.running: list[Request] = []  # row i of the cache belongs to running[i]
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.wake = threading.Event()
        self.stopped = False
        self.steps = 0  # decode steps taken (for tests and logs)
        self.thread = threading.Thread(target=self._loop, name="lmlab-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------ API
    def submit(self, prompt: list[int], params: SamplingParams, on_token) -> Request:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                             f"context of {self.max_len} tokens")
        if self.waiting.qsize() >= self.max_waiting:
            raise QueueFull(f"{self.waiting.qsize()} requests are already waiting")
        gen = torch.Generator(device=self.model.device).manual_seed(params.seed) if params.seed is not None else None
        req = Request(list(prompt), params, on_token, gen)
        self.waiting.put(req)
        self.wake.set()
        return req

    def shutdown(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts."""
        return len(self.running), self.waiting.qsize()

    # ----------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self.stopped:
            if not self.running and self.waiting.empty():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # noqa: BLE001 -- never let one bad step kill the server
                for req in self.running:
                    req.on_token(None, f"error: {type(e).__name__}: {e}")
                self.running = []
                self.cache.length = 0

    @torch.inference_mode()
    def _admit(self) -> None:
        while len(self.running) < self.max_batch and not self.waiting.empty():
            req = self.waiting.get_nowait()
            if req.cancelled:
                continue
            try:
                self._prefill(req)
            except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
                req.on_token(None, f"error: {type(e).__name__}: {e}")

    def _prefill(self, req: Request) -> None:
        n, cache = len(req.prompt), self.cache
        if max(cache.length, n) + 1 > cache.max_len:  # no slot left after the prompt for its first decode step
            self._compact()
        small = self.model.new_cache(1, n)
        h = self.model.hidden_states(torch.tensor([req.prompt], device=self.model.device), cache=small)[:, -1]
        row, end = len(self.running), max(cache.length, n)  # the prompt fills slots [end - n, end) of its row
        if end > cache.length:  # the timeline moves on for everyone: the gap is no one's
            cache.key_mask[:, cache.length:end] = False
            cache.length = end
        for layer in range(len(cache.k)):
            cache.k[layer][row, :, end - n:end] = small.k[layer][0]
            cache.v[layer][row, :, end - n:end] = small.v[layer][0]
        cache.key_mask[row] = False
        cache.key_mask[row, end - n:end] = True
        req.position = n
        self.running.append(req)
        self._emit(row, h @ self.head)

    def _step(self) -> None:
        cache, n = self.cache, len(self.running)
        if cache.length + 1 > cache.max_len:
            self._compact()
        tokens = torch.tensor([[r.generated[-1]] for r in self.running], device=self.model.device)
        positions = torch.tensor([[r.position] for r in self.running], device=self.model.device)
        cache.key_mask[:n, cache.length] = True
        view = _rows(cache, n)
        with torch.inference_mode():
            h = self.model.hidden_states(tokens, position_ids=positions, cache=view)[:, -1]  # (n, H)
        cache.length = view.length
        self.steps += 1
        for r in self.running:
            r.position += 1
        logits = h @ self.head  # (n, vocab): one product for the batch
        greedy = logits.argmax(dim=-1).tolist()
        for row in reversed(range(n)):  # reversed: a finished row is refilled from the end
            self._emit(row, logits[row: row + 1], greedy[row])

    def _emit(self, row: int, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Pick the next token of running[row] from its logits (1, vocab); finish the request if done."""
        req = self.running[row]
        if req.cancelled:
            return self._finish(row, None)
        p = req.params
        if p.temperature == 0 and p.repetition_penalty == 1 and greedy is not None:
            tok = greedy
        else:
            context = torch.tensor([req.prompt + req.generated], device=logits.device) \
                if p.repetition_penalty != 1 else None
            tok = int(sample(logits, p, context, req.generator)[0])
        req.generated.append(tok)
        req.on_token(tok, None)
        if tok in p.stop_token_ids:
            self._finish(row, "stop")
        elif len(req.generated) >= p.max_new_tokens or req.position + 1 >= self.max_len:
            self._finish(row, "length")

    def _finish(self, row: int, reason: str | None) -> None:
        req, last = self.running[row], len(self.running) - 1
        if reason is not None:
            req.on_token(None, reason)
        if row != last:  # move the last running request into this row
            cache = self.cache
            for layer in range(len(cache.k)):
                cache.k[layer][row] = cache.k[layer][last]
                cache.v[layer][row] = cache.v[layer][last]
            cache.key_mask[row] = cache.key_mask[last]
            self.running[row] = self.running[last]
        self.running.pop()
        if not self.running:
            self.cache.length = 0

    def _compact(self) -> None:
        """Move each running row's real slots to the right end of [0, M) (M = the longest row), in order,
        freeing the timeline after M."""
        cache, n = self.cache, len(self.running)
        owned = [torch.nonzero(cache.key_mask[r]).squeeze(1) for r in range(n)]
        m = max([len(o) for o in owned] + [0])
        for r, idx in enumerate(owned):
            for layer in range(len(cache.k)):
                cache.k[layer][r, :, m - len(idx):m] = cache.k[layer][r, :, idx].clone()
                cache.v[layer][r, :, m - len(idx):m] = cache.v[layer][r, :, idx].clone()
            cache.key_mask[r] = False
            cache.key_mask[r, m - len(idx):m] = True
        cache.length = m
        if m + 1 > cache.max_len:
            raise RuntimeError("the KV cache is full")


def wait_idle(engine: Engine, timeout: float = 30.0) -> bool:
    """Block until no request is running or waiting (tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if engine.load == (0, 0):
            return True
        time.sleep(0.01)
    return False
