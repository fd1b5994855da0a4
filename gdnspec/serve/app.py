"""The HTTP side: FastAPI routes (OpenAI schema), server-sent events, API key, body limits; served by uvicorn.

    POST /v1/completions         prompt (text or token ids) -> text
    POST /v1/chat/completions    messages -> the assistant's answer (the model's chat template)
    GET  /v1/models, /health, /metrics (Prometheus text)

Each request is validated (protocol.py), tokenized and checked against --max-model-len here, then handed to the
engine loop (loop.py), whose thread posts its new text back to this event loop (call_soon_threadsafe). A client
that disconnects (a closed stream, or a non-streamed request given up) is cancelled in the loop, which frees its
slot before the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gdnspec.serve.chat import ChatTemplate, ChatTemplateError
from gdnspec.serve.loop import EngineLoop, Event, GenRequest, QueueFull, Unavailable
from gdnspec.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class ServeState:
    """What the routes need: the loop, the tokenizer, limits and defaults."""

    loop: EngineLoop
    tokenizer: object
    model_name: str
    vocab_size: int
    max_model_len: int
    eos_ids: tuple[int, ...]
    chat_template: ChatTemplate
    sampling: dict  # default temperature / top_k / top_p (the model's generation_config.json, else greedy)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    created: int = field(default_factory=lambda: int(time.time()))

    def chat_stop_ids(self) -> tuple[int, ...]:
        eot = self.chat_template.end_of_turn
        tid = self.tokenizer.token_to_id(eot) if eot else None
        return self.eos_ids + ((tid,) if tid is not None and tid not in self.eos_ids else ())


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, limit: int):
    """The body as JSON; 413 past `limit` bytes (checked while reading), 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body has {declared} bytes; this server takes at most {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"the request body is larger than this server takes ({limit} bytes)", status=413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None


def _check_key(state: ServeState, request: Request) -> None:
    if state.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError("invalid or missing API key (send the header Authorization: Bearer <key>)", status=401,
                       code="invalid_api_key")


def _prompt_ids(state: ServeState, req) -> tuple[list[int], str]:
    """-> (token ids, the field that gave them)."""
    if isinstance(req, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            text = state.chat_template.render(messages)
        except ChatTemplateError as e:
            raise APIError(f"messages: {e}", param="messages") from None
        ids = state.tokenizer.encode(text, add_special_tokens=False).ids
        field_name = "messages"
    else:
        p = req.single_prompt()
        if isinstance(p, str):
            ids, field_name = state.tokenizer.encode(p).ids, "prompt"
        else:
            bad = [t for t in p if not 0 <= t < state.vocab_size]
            if bad:
                raise APIError(f"prompt: token ids must lie in [0, {state.vocab_size}), got {bad[0]}", param="prompt")
            ids, field_name = list(p), "prompt"
    if not ids:
        raise APIError(f"{field_name}: encodes to no tokens", param=field_name)
    if len(ids) >= state.max_model_len:
        raise APIError(f"{field_name}: {len(ids)} tokens; this server's context (--max-model-len) is "
                       f"{state.max_model_len} tokens, prompt and completion together", param=field_name)
    return ids, field_name


def _budget(state: ServeState, req, prompt_len: int) -> int:
    room = state.max_model_len - prompt_len
    asked = req.token_budget if isinstance(req, ChatCompletionRequest) else req.max_tokens
    name = "max_tokens" if isinstance(req, CompletionRequest) or req.max_tokens is not None else \
        "max_completion_tokens"
    if asked is None:
        return room if isinstance(req, ChatCompletionRequest) else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
    if asked > room:
        raise APIError(f"{name}: {asked} new tokens after a prompt of {prompt_len} tokens exceed this server's context "
                       f"(--max-model-len {state.max_model_len}); at most {room}", param=name)
    return asked


def _gen_request(state: ServeState, req, deliver) -> GenRequest:
    ids, _ = _prompt_ids(state, req)
    budget = _budget(state, req, len(ids))
    d = state.sampling
    temperature = d["temperature"] if req.temperature is None else float(req.temperature)
    top_k = d["top_k"] if req.top_k is None else (None if req.top_k in (-1, 0) else req.top_k)
    top_p = d["top_p"] if req.top_p is None else float(req.top_p)
    base = state.chat_stop_ids() if isinstance(req, ChatCompletionRequest) else state.eos_ids
    stops = tuple(dict.fromkeys(base + tuple(req.stop_ids(state.vocab_size))))
    return GenRequest(prompt_ids=ids, max_tokens=budget, deliver=deliver, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=req.seed, stop_ids=stops, stop_strings=tuple(req.stop_strings()),
                      tokenizer=state.tokenizer)


class _Reply:
    """Builds the OpenAI response objects of one request (completion or chat, whole or chunks)."""

    def __init__(self, state: ServeState, req):
        self.chat = isinstance(req, ChatCompletionRequest)
        self.req = req
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = state.model_name

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _token_ids(self, choice: dict, ids: list[int]) -> None:
        if self.req.return_token_ids:
            choice["token_ids"] = ids

    def whole(self, text: str, ids: list[int], last: Event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
            out = {**self._head("chat.completion"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        self._token_ids(choice, ids)
        out["usage"] = last.usage
        if self.req.return_spec_stats:
            out["spec_stats"] = last.spec_stats
        return out

    def chunk(self, ev: Event | None, *, role: bool = False) -> dict:
        finish = ev.finish_reason if ev is not None else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": ev.text} if ev.text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": finish}
            out = {**self._head("text_completion"), "choices": [choice]}
        if ev is not None:
            self._token_ids(choice, ev.token_ids)
            if finish is not None and self.req.return_spec_stats:
                out["spec_stats"] = ev.spec_stats
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body is read already, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="gdnspec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    loop = state.loop

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(APIError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code, type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return _error(APIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error"))

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        running, waiting = loop.counts()
        loop.metrics.running.set(running)
        loop.metrics.waiting.set(waiting)
        return Response(generate_latest(loop.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(state, request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "gdnspec", "max_model_len": state.max_model_len}]}

    async def generate(request: Request, schema):
        _check_key(state, request)
        req = parse(schema, await _read_json(request, state.max_body_bytes))
        if req.model is not None and req.model != state.model_name:
            raise APIError(f"model: {req.model!r} is not served here; this server serves {state.model_name!r}",
                           param="model", status=404, code="model_not_found")
        aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(ev: Event) -> None:
            aloop.call_soon_threadsafe(queue.put_nowait, ev)

        gen = _gen_request(state, req, deliver)
        try:
            loop.submit(gen)
        except QueueFull as e:
            raise APIError(f"the server is busy: {e}; retry later", status=429, type="rate_limit_error") from None
        except Unavailable as e:
            raise APIError(str(e), status=503, type="server_error") from None
        reply = _Reply(state, req)
        if req.stream:
            return StreamingResponse(_stream(gen, queue, reply, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, gen, queue, reply)

    async def _whole(request: Request, gen: GenRequest, queue: asyncio.Queue, reply: _Reply):
        watcher = asyncio.ensure_future(_watch_disconnect(request))
        texts, ids = [], []
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:  # the client went away
                    getter.cancel()
                    loop.cancel(gen)
                    return Response(status_code=499)
                ev = getter.result()
                texts.append(ev.text)
                ids.extend(ev.token_ids)
                if ev.finish_reason is not None:
                    if ev.error is not None:
                        raise APIError(f"generation failed: {ev.error}", status=500, type="server_error")
                    return reply.whole("".join(texts), ids, ev)
        finally:
            watcher.cancel()
            if not gen.finished:
                loop.cancel(gen)

    async def _stream(gen: GenRequest, queue: asyncio.Queue, reply: _Reply, req):
        try:
            if reply.chat:
                yield _sse(reply.chunk(None, role=True))
            while True:
                ev = await queue.get()
                if ev.error is not None:
                    yield _sse(APIError(f"generation failed: {ev.error}", status=500, type="server_error").body())
                    break
                if ev.text or ev.finish_reason is not None or (req.return_token_ids and ev.token_ids):
                    yield _sse(reply.chunk(ev))
                if ev.finish_reason is not None:
                    if req.include_usage:
                        yield _sse(reply.usage_chunk(ev.usage))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnected (the response task is cancelled while it waits)
            if not gen.finished:
                loop.cancel(gen)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest)

    return app


def run(app: FastAPI, loop: EngineLoop, sock, *, shutdown_timeout: float) -> None:
    """Serve `app` on the bound socket until SIGINT / SIGTERM: then new connections are refused, in-flight requests
    may finish for `shutdown_timeout` seconds (the loop aborts the rest: their streams end with finish_reason
    "abort" and [DONE]), and the engine loop stops."""
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """As uvicorn's, but the signal is not raised again after the shutdown: the command ends normally."""
            loop.drain(shutdown_timeout)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
            else:
                self.should_exit = True

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        loop.stop()
