"""Continuous batching: one thread decodes every running request together, admitting new ones between steps.

    engine = Engine(model, max_batch=32)
    req = engine.submit(prompt_ids, SamplingParams(...), on_token)   # on_token(token_id or None=finished)
    req.cancel()                                                     # a client went away: its slot frees

The KV cache has `max_batch` rows on one shared timeline of `max_len` slots. Running requests occupy rows
0..n-1 (a finished request's row is refilled by the last one, so a decode step reads n rows, not
max_batch). Waiting requests are prefilled together (one left-padded batch in a cache of their own) and
their keys/values copied into free rows so that every prompt ends where the timeline is; `key_mask` hides
every slot a row does not own (the others' older tokens, gaps), and each row carries its own position ids,
so a request decodes exactly as it would alone. Attention reads the whole timeline, so once it is mostly
no one's (or full) the rows are compacted into its first M slots (M = the longest row; slots kept in order).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmlab.inference.engine import pad_left
from lmlab.inference.kernels import lm_head
from lmlab.inference.sampling import SamplingParams, sample
from lmlab.models.layers import KVCache

PREFILL_TOKENS = 4096  # most (padded) prompt tokens prefilled in one forward
COMPACT_SLACK = 64  # timeline slots beyond twice the longest row before the cache is compacted


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (the server answers 429)."""


@dataclass(eq=False)  # identity: two requests with the same prompt are still two
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
        self.head = lm_head(model)  # (n, H) -> (n, vocab), the weight prepared once (inference/kernels.py)
        self.running: list[Request] = []  # row i of the cache belongs to running[i]
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.wake = threading.Event()
        self.stopped = False
        self.steps = 0  # decode steps taken (for tests and logs)
        self.compactions = 0
        self.admitting = 0  # requests taken from `waiting`, not yet in `running`
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
        """(running, waiting) request counts; requests being prefilled count as running."""
        return len(self.running) + self.admitting, self.waiting.qsize()

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
                    _fail(req, e)
                self.running = []
                self.cache.length = 0

    @torch.inference_mode()
    def _admit(self) -> None:
        """Move waiting requests into free rows, prefilling them together in groups of at most PREFILL_TOKENS
        (padded) tokens; a group that fails is retried one request at a time, so only the bad one fails."""
        while len(self.running) < self.max_batch and not self.waiting.empty():
            group, width = [], 0  # width: the group's longest prompt
            while len(self.running) + len(group) < self.max_batch and not self.waiting.empty():
                req = self.waiting.queue[0]  # peek: taken only if it fits the group
                if group and (len(group) + 1) * max(width, len(req.prompt)) > PREFILL_TOKENS:
                    break
                self.waiting.get_nowait()
                if not req.cancelled:
                    group.append(req)
                    width = max(width, len(req.prompt))
                    self.admitting += 1
            try:
                self._prefill(group)
            except Exception as e:  # noqa: BLE001 -- retry alone: the bad request fails, the others go on
                if len(group) == 1:
                    _fail(group[0], e)
                    continue
                for req in [r for r in group if not any(r is x for x in self.running)]:
                    try:
                        self._prefill([req])
                    except Exception as e1:  # noqa: BLE001
                        _fail(req, e1)
            finally:
                self.admitting = 0

    def _prefill(self, reqs: list[Request]) -> None:
        """Run the prompts of `reqs` as one left-padded batch in a cache of their own, then copy their keys/values
        into the next free rows so that every prompt ends where the shared timeline is."""
        if not reqs:
            return
        ids, mask = (t.to(self.model.device) for t in pad_left([r.prompt for r in reqs]))  # (k, n) each
        (k, n), cache = ids.shape, self.cache
        if max(cache.length, n) + 1 > cache.max_len:  # no slot left after the prompts for their first decode step
            self._compact()
        small = self.model.new_cache(k, n)
        h = self.model.hidden_states(ids, attention_mask=mask, cache=small)[:, -1]  # (k, H)
        row, end = len(self.running), max(cache.length, n)  # the prompts fill slots [end - n, end) of rows row..
        if end > cache.length:  # the timeline moves on for everyone: the gap is no one's
            cache.key_mask[:, cache.length:end] = False
            cache.length = end
        for layer in range(len(cache.k)):
            cache.k[layer][row:row + k, :, end - n:end] = small.k[layer]
            cache.v[layer][row:row + k, :, end - n:end] = small.v[layer]
        cache.key_mask[row:row + k] = False
        cache.key_mask[row:row + k, end - n:end] = mask.bool()
        for r in reqs:
            r.position = len(r.prompt)
        self.running.extend(reqs)
        logits = self.head(h)  # (k, vocab)
        greedy = logits.argmax(dim=-1).tolist()
        for i in reversed(range(k)):  # reversed: a finished row is refilled from the end
            self._emit(row + i, logits[i:i + 1], greedy[i])

    def _step(self) -> None:
        cache, n = self.cache, len(self.running)
        # attention reads every slot of the timeline: compact once most of it is no one's (or it is full)
        longest = max(r.position for r in self.running)
        if cache.length + 1 > cache.max_len or cache.length > 2 * longest + COMPACT_SLACK:
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
        logits = self.head(h)  # (n, vocab): one product for the batch
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
        cache, n, L = self.cache, len(self.running), self.cache.length
        owned = cache.key_mask[:n, :L]
        m = int(owned.sum(1).max()) if n else 0
        # a stable sort puts each row's unowned slots first and its owned ones last, both in timeline order
        idx = torch.argsort(owned.to(torch.int8), dim=1, stable=True)[:, L - m:]  # (n, m) slots kept
        new_mask = owned.gather(1, idx)
        for kv in (cache.k, cache.v):
            for t in kv:
                gather = idx[:, None, :, None].expand(n, t.shape[1], m, t.shape[3])
                t[:n, :, :m] = t[:n].gather(2, gather)
        cache.key_mask[:n] = False
        cache.key_mask[:n, :m] = new_mask
        cache.length = m
        self.compactions += 1
        if m + 1 > cache.max_len:
            raise RuntimeError("the KV cache is full")

def _fail(req: Request, e: Exception) -> None:
    req.on_token(None, f"error: {type(e).__name__}: {e}")


def wait_idle(engine: Engine, timeout: float = 30.0) -> bool:
    """Block until no request is running or waiting (tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if engine.load == (0, 0):
            return True
        time.sleep(0.01)
    return False
