"""`lmlab serve`: an OpenAI-compatible HTTP API over one model directory, and the chat page.

    lmlab serve --model runs/sft/final            # http://127.0.0.1:8000  (chat page at /, API docs at /docs)
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template; `stream: true` sends server-sent events in OpenAI's chunk format ending with `data: [DONE]`),
POST /v1/embeddings (encoder models). Decoder requests go to one Engine (serve/engine.py), which decodes
all running requests together. Errors are OpenAI's body {"error": {"message", "type", "param", "code"}}
with a 4xx status; a full queue is 429 with Retry-After; a client that disconnects frees its slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = \
            status, message, param, code, type_, headers


def _error(status, message, type_="invalid_request_error", param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------- request bodies
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields lmlab does not use are accepted and ignored
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk carries the usage counts


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: int | None = 16  # OpenAI's default for completions


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]


class _APIKey:
    """401 for a /v1/ request without `Authorization: Bearer KEY`. Plain ASGI (not @app.middleware, whose
    BaseHTTPMiddleware relays every streamed chunk through an extra task and memory stream)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and \
                dict(scope["headers"]).get(b"authorization") != self.expected:
            response = _error(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                              code="invalid_api_key")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _Relay:
    """Hands tokens from the engine thread to the event loop in batches: one loop wake-up per decode step
    instead of one per token (call_soon_threadsafe writes to the loop's self-pipe each time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock = loop, [], threading.Lock()

    def put(self, q: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((q, item))
            if len(self.items) > 1:  # a flush is already scheduled
                return
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for q, item in items:
            q.put_nowait(item)


# ------------------------------------------------------------------------------------------------- app
class Server:
    """The loaded model and what the routes share."""

    def __init__(self, model_dir, model_id: str | None, max_batch: int, max_waiting: int, max_len: int | None):
        import lmlab
        from lmlab.serve.engine import Engine

        self.model = lmlab.load_model(model_dir)
        self.tok = lmlab.load_tokenizer(model_dir)
        path = Path(model_dir).resolve()
        self.model_id = model_id or (path.parent.name if path.name == "final" else path.name)
        self.family = self.model.config.family
        self.created = int(time.time())
        self.engine = Engine(self.model, max_batch, max_len, max_waiting) if self.family == "decoder" else None
        self.context = self.engine.max_len if self.engine else self.model.config.max_position_embeddings
        self.relay: _Relay | None = None  # made on the first request, in the server's event loop

    def check_model(self, name: str, generate: bool = True) -> None:
        if name != self.model_id:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        if generate and self.engine is None:
            raise APIError(400, f"{self.model_id} is a {self.family} model: only /v1/embeddings is served for it",
                           param="model", code="model_not_supported")

    def params(self, body: _Sampling, n_prompt: int, max_tokens: int | None, stop_ids: list[int]):
        from lmlab.inference.sampling import SamplingParams
        room = self.context - n_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, but the prompt has "
                                f"{n_prompt} tokens", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1 or max_tokens > room:
            raise APIError(400, f"max_tokens must be between 1 and {room} (context {self.context} tokens, prompt "
                                f"{n_prompt} tokens), got {max_tokens}", param="max_tokens")
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop_token_ids=stop_ids, seed=body.seed)


async def _choices(server: Server, ids: list[int], params, stops: list[str], n: int):
    """Run n engine requests for `ids`; yield (index, text delta, finish reason or None, tokens so far).
    Text is decoded incrementally, never splitting a character, and held back while it could be the start
    of a stop string; a stop string ends its choice (and is not sent)."""
    from dataclasses import replace

    from lmlab.serve.engine import QueueFull
    from lmlab.tokenizer import TextStream
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    if server.relay is None or server.relay.loop is not loop:
        server.relay = _Relay(loop)
    relay, reqs = server.relay, []
    try:
        for i in range(n):
            p = replace(params, seed=None if params.seed is None else params.seed + i)
            cb = (lambda i: lambda tok, reason: relay.put(q, (i, tok, reason)))(i)
            try:
                reqs.append(server.engine.submit(ids, p, cb))
            except QueueFull as e:
                raise APIError(429, f"The server is busy ({e}); retry shortly", type_="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
            except ValueError as e:
                raise APIError(400, str(e)) from None
        streams = [TextStream(server.tok) for _ in range(n)]
        texts, counts, sent, done = [""] * n, [0] * n, [0] * n, 0  # decoded text, tokens, characters sent
        longest_stop = max(map(len, stops), default=0)
        while done < n:
            i, tok, reason = await q.get()
            if sent[i] is None:  # already ended by a stop string
                continue
            if tok is not None:
                texts[i] += streams[i].add(tok)
                counts[i] += 1
            if reason is not None:
                texts[i] += streams[i].flush()
            text = texts[i]
            # a stop string can only begin near the unsent end: earlier ones were found before
            lo = max(0, sent[i] - longest_stop)
            cut = min((k for k in (text.find(s, lo) for s in stops) if k >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                reqs[i].cancel()
            elif reason is None:  # hold back what could be the start of a stop string
                hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                text = text[: len(text) - hold]
            if reason is not None and reason.startswith("error"):
                raise APIError(500, f"generation failed: {reason[7:]}", type_="server_error")
            delta = text[sent[i]:]
            sent[i] = None if reason is not None else len(text)
            done += reason is not None
            if delta or reason is not None:
                yield i, delta, reason, counts[i]
    finally:
        for r in reqs:
            r.cancel()


def create_app(model_dir, api_key: str | None = None, model_id: str | None = None, max_batch: int = 32,
               max_waiting: int = 256, max_len: int | None = None) -> FastAPI:
    server = Server(model_dir, model_id, max_batch, max_waiting, max_len)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if server.engine:
            server.engine.shutdown()

    app = FastAPI(title="lmlab", description=f"OpenAI-compatible API serving {server.model_id}", version="1",
                  lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return _error(400, f"Invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return _error(400, f"{where or 'body'}: {err.get('msg', 'invalid')}", param=where or None)

    @app.exception_handler(Exception)
    async def crashed(_, e: Exception):  # one request's failure is its own 500, never the server's end
        return _error(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")

    if api_key:
        app.add_middleware(_APIKey, key=api_key)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        if not (STATIC / "index.html").exists():
            raise APIError(404, "the chat page is not installed", code="not_found")
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        running, waiting = server.engine.load if server.engine else (0, 0)
        return {"status": "ok", "model": server.model_id, "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "lmlab"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        from lmlab.chat import ChatTemplateError, encode_chat, stop_token_ids
        server.check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = encode_chat(server.tok, messages, add_generation_prompt=True)[0]
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        params = server.params(body, len(ids), body.max_completion_tokens or body.max_tokens,
                               stop_token_ids(server.tok))
        return await _respond(server, body, ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        server.check_model(body.model)
        ids = server.tok.encode(body.prompt)
        if not ids:
            raise APIError(400, "prompt: empty after tokenization", param="prompt")
        eos = server.tok.eos_token_id
        params = server.params(body, len(ids), body.max_tokens, [eos] if eos is not None else [])
        return await _respond(server, body, ids, params, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        import lmlab
        server.check_model(body.model, generate=False)
        if server.family != "encoder":
            raise APIError(400, f"{server.model_id} is a {server.family} model, not an embedding model",
                           param="model", code="model_not_supported")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise APIError(400, "input: non-empty strings expected", param="input")
        vectors = await asyncio.to_thread(lambda: lmlab.embed(server.model, server.tok, texts).tolist())
        n_tokens = sum(len(server.tok.encode(t)) for t in texts)
        return {"object": "list", "model": server.model_id, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}

    return app


async def _respond(server: Server, body: _Sampling, ids: list[int], params, chat: bool):
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    gen = _choices(server, ids, params, [s for s in stops if s], body.n)
    if not body.stream:
        texts, reasons, counts = [""] * body.n, [None] * body.n, [0] * body.n
        async for i, delta, reason, count in gen:
            texts[i] += delta
            reasons[i], counts[i] = reason or reasons[i], count
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i]}
                   if chat else {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                   for i in range(body.n)]
        usage = {"prompt_tokens": len(ids), "completion_tokens": sum(counts), "total_tokens": len(ids) + sum(counts)}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": server.model_id, "choices": choices, "usage": usage}
    first = await _first(gen)  # errors before the first token (429, 400) are plain HTTP errors

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": server.model_id}

    def chunk(choices: list, **usage) -> str:
        obj = head | {"choices": choices} | ({"usage": usage or None} if include_usage else {})
        return f"data: {json.dumps(obj)}\n\n"

    def choice(i, delta: dict | str, reason) -> dict:
        return {"index": i, "delta": delta, "finish_reason": reason} if chat else \
            {"index": i, "text": delta, "logprobs": None, "finish_reason": reason}

    async def events():
        counts = [0] * body.n
        try:
            if chat:
                for i in range(body.n):
                    yield chunk([choice(i, {"role": "assistant", "content": ""}, None)])
            pending = [first] if first is not None else []
            async for i, delta, reason, counts[i] in _chain(pending, gen):
                yield chunk([choice(i, {"content": delta} if chat and delta else {} if chat else delta, reason)])
            if include_usage:  # OpenAI's last chunk: no choices, the request's token counts
                yield chunk([], prompt_tokens=len(ids), completion_tokens=sum(counts),
                            total_tokens=len(ids) + sum(counts))
        except APIError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
        finally:  # also when the client went away mid-stream: cancel its requests, freeing their slots
            await gen.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _first(gen) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(head: list, gen):
    for item in head:
        yield item
    async for item in gen:
        yield item
