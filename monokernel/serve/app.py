"""The OpenAI-compatible HTTP API over an EngineLoop: /v1/models, /v1/completions, /v1/chat/completions (plain
or server-sent events), /health, /metrics.

The asyncio side only parses, tokenizes (in a worker thread: a 200 000-token prompt takes a while) and waits
on a per-request asyncio queue fed by the engine thread. A request whose client goes away is aborted, which
frees its slot before the next engine step.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from ..runtime.requests import RequestEvent
from .loop import EngineLoop, QueueFull
from .protocol import FINISH_REASONS, APIError, ChatRequest, CompletionRequest, parse

MAX_BODY_BYTES = 16 << 20      # a 200 000-token prompt as text or ids is ~1-2 MB; anything far larger is refused
DISCONNECT_POLL_S = 0.25       # how often a non-streamed request checks that its client is still there


def create_app(loop: EngineLoop, *, model_name: str, api_key: str | None = None, queue_full_status: int = 429,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="monokernel", docs_url=None, redoc_url=None, openapi_url=None)
    sched = loop.scheduler
    tok = sched.engine.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     type=kind).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        # a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware hides client disconnects
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with (--api-key)", type="authentication_error",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/health")
    async def health():
        body = {"status": "ok" if loop.alive else "engine thread stopped", "model": model_name,
                "running": sched.num_running, "waiting": sched.num_waiting, "max_batch": sched.batch,
                "engine": sched.kind, "failed_steps": sched.stats.failures}
        return JSONResponse(body, status_code=200 if loop.alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(loop.metrics.render(), media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "monokernel", "max_model_len": sched.max_seq}]}

    async def read_body(request: Request):
        too_big = APIError(413, f"the request body is larger than the server's limit of {max_body_bytes} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big   # refused before a byte of it is read
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > max_body_bytes:
                raise too_big
            parts.append(part)
        body = b"".join(parts)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}): send UTF-8 JSON") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
                           ) from None

    async def start(req, prompt=None, messages=None, logprobs=None, default_max=None):
        """Validates, tokenizes and queues one request; returns (engine request, its event queue)."""
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist: this server serves {model_name!r} "
                                "(GET /v1/models)", type="not_found_error", param="model", code="model_not_found")
        req.refuse_unsupported()
        if req.stop is not None and any(not s for s in ([req.stop] if isinstance(req.stop, str) else req.stop)):
            raise APIError(400, "stop strings must not be empty", param="stop")

        def build():
            ids = sched.encode(prompt, messages)
            room = max(1, sched.max_seq - len(ids))
            max_tokens = req.max_tokens if default_max is None or req.max_tokens is not None else default_max(room)
            return sched.make_request(ids, req.sampling(max_tokens), logprobs=logprobs, ignore_eos=req.ignore_eos,
                                      request_id=f"{'chatcmpl' if messages else 'cmpl'}-{uuid.uuid4().hex[:24]}")

        try:
            r = await run_in_threadpool(build)
        except InputError as e:
            raise _input_error(e, "messages" if messages is not None else "prompt") from None
        events: asyncio.Queue[RequestEvent] = asyncio.Queue()
        aio = asyncio.get_running_loop()
        try:
            loop.submit(r, lambda ev: aio.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise APIError(queue_full_status, str(e), type="server_overloaded" if queue_full_status == 503 else
                           "rate_limit_error", code="queue_full") from None
        return r, events

    async def collect(request: Request, r, events) -> list[RequestEvent]:
        out: list[RequestEvent] = []
        checked = time.monotonic()
        try:
            while not (out and out[-1].finished):
                try:
                    out.append(await asyncio.wait_for(events.get(), DISCONNECT_POLL_S))
                except asyncio.TimeoutError:
                    pass
                # every poll interval, also while tokens arrive faster than it (a GPU, or a dense model on a
                # CPU, never leaves the queue empty that long)
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        loop.abort(r.id)
                        return out
        except asyncio.CancelledError:
            loop.abort(r.id)
            raise
        if out[-1].error is not None:
            raise _engine_error(out[-1].error)
        return out

    async def stream(r, events, render) -> AsyncIterator[str]:
        done = False
        try:
            for chunk in render.head():
                yield _sse(chunk)
            while not done:
                ev = await events.get()
                done = ev.finished
                if ev.error is not None:
                    yield _sse(_engine_error(ev.error).body())
                    break
                yield _sse(render.chunk(ev))
            else:
                if render.include_usage:
                    yield _sse(render.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if not done:   # the client went away (the generator was closed or cancelled): free the slot
                loop.abort(r.id)

    @v1.post("/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_body(request))
        r, events = await start(req, prompt=req.single_prompt(), logprobs=req.logprobs)
        render = _Render(r, req, model_name, tok, chat=False)
        if req.stream:
            return StreamingResponse(stream(r, events, render), media_type="text/event-stream")
        return render.full(await collect(request, r, events))

    @v1.post("/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await read_body(request))
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        messages = [m.as_template_message() for m in req.messages]
        # no max_tokens: whatever room the context leaves, as OpenAI and vLLM do for chat
        r, events = await start(req, messages=messages, logprobs=req.wanted_logprobs,
                                default_max=lambda room: room)
        render = _Render(r, req, model_name, tok, chat=True)
        if req.stream:
            return StreamingResponse(stream(r, events, render), media_type="text/event-stream")
        return render.full(await collect(request, r, events))

    app.include_router(v1)
    app.state.loop = loop
    return app


class _Render:
    """The OpenAI response objects of one request: the whole response, or its stream chunks."""

    def __init__(self, r, req, model: str, tok, chat: bool):
        self.r, self.req, self.model, self.tok, self.chat = r, req, model, tok, chat
        self.include_usage = req.include_usage
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offset = 0   # characters of text so far (the completions API's text_offset)

    def _base(self, obj: str) -> dict:
        return {"id": self.r.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        n, m = len(self.r.prompt_ids), len(self.r.seq.token_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id]) if self.tok is not None else str(token_id)

    def _logprobs(self, evs: list[RequestEvent]) -> dict | None:
        if self.r.logprobs is None:
            return None
        if self.chat:
            def entry(t, lp):
                s = self._token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            return {"content": [{**entry(ev.token_id, ev.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in ev.top_logprobs]} for ev in evs]}
        offsets = []
        for ev in evs:
            offsets.append(self.offset)
            self.offset += len(ev.text)
        return {"tokens": [self._token(ev.token_id) for ev in evs], "token_logprobs": [ev.logprob for ev in evs],
                "top_logprobs": [{self._token(t): lp for t, lp in ev.top_logprobs} for ev in evs]
                if self.r.logprobs else None, "text_offset": offsets}

    def full(self, evs: list[RequestEvent]) -> dict:
        text = "".join(ev.text for ev in evs)
        reason = FINISH_REASONS.get(evs[-1].finish_reason, evs[-1].finish_reason) if evs else None
        choice = {"index": 0, "logprobs": self._logprobs(evs), "finish_reason": reason}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self._base(self.object), "choices": [choice], "usage": self.usage()}

    def head(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._wrap({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})]

    def chunk(self, ev: RequestEvent) -> dict:
        reason = FINISH_REASONS.get(ev.finish_reason, ev.finish_reason) if ev.finished else None
        lp = self._logprobs([ev])
        if self.chat:
            choice = {"index": 0, "delta": {"content": ev.text} if ev.text or not ev.finished else {},
                      "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": reason}
        return self._wrap(choice)

    def _wrap(self, choice: dict) -> dict:
        out = {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict:
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _input_error(e: InputError, what: str) -> APIError:
    """The engine's words for the API's: its max_new_tokens is the request's max_tokens."""
    message = str(e).replace("max_new_tokens", "max_tokens").replace("max_seq=", "--max-seq ")
    param = "max_tokens" if "max_tokens=" in message else what
    return APIError(400, message, param=param, code="context_length_exceeded" if "context holds" in message else None)


def _engine_error(e: BaseException) -> APIError:
    return APIError(500, f"the engine failed while running this request ({type(e).__name__}: {str(e)[:300]}); "
                         "it has been reset and serves new requests: retry", type="server_error", code="engine_error")
