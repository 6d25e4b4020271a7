"""Stage 8: serve a checkpoint through the OpenAI API, with continuous batching.

    python serve.py --ckpt out/sft                       # http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
         -d '{"model": "sft", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \
               print(c.chat.completions.create(model='sft', messages=[{'role': 'user', 'content': 'Hi'}]))"

What it does, top to bottom: load the checkpoint (any nanofm checkpoint or run directory: base,
SFT, RLHF), put its engine behind a Scheduler (nanofm/scheduler.py: one thread drives a running
batch; requests join and leave at any step), and answer
- GET  /v1/models                 the one model served, named after its directory (or --name);
- POST /v1/completions            text completion (any causal model);
- POST /v1/chat/completions       chat, rendered with the checkpoint's chat format (a base model
                                  without one gets a 400 that says to use /v1/completions);
- GET  /                          a chat page (web/chat.html): streamed replies, the conversation,
                                  thumbs up/down per reply;
- GET  /health                    ok, and what is loaded;
- GET  /metrics                   Prometheus text: requests, tokens, latency, queue, batch size;
- POST /v1/feedback               {"request_id", "rating": "up" | "down" | 1..5, "comment"};
- POST /admin/reload              {"ckpt": path}: serve another checkpoint, dropping nothing
                                  (or --watch: reload when the run directory's `latest` changes);
both POSTs with or without streaming (server-sent events, `data: {json}` chunks, the first
chat delta carrying the role, then `data: [DONE]`), with temperature, top_p, top_k, max_tokens,
stop, seed and n, finish_reason stop/length, and usage.

Design decisions:
- The request and response shapes follow OpenAI's (REFERENCES.md), so the official `openai`
  client works unchanged (tested against a real server on 127.0.0.1).
- Bad input gets a 400 with OpenAI's error body ({"error": {"message", "type", "param", "code"}}),
  never a 500: pydantic checks the shapes and ranges, the engine the prompt's length.
- Binds 127.0.0.1 unless --host says otherwise.
- Every request (prompt or messages, output, settings, latency, token counts) is written to the
  interaction log (nanofm/interactions.py: SQLite in WAL mode, or PostgreSQL by URL, which
  replicas share) before the client gets the end of its answer; a reply the log cannot keep is
  a 503, not an unlogged answer. POST /v1/feedback joins a rating to a request id. GET /metrics counts requests,
  tokens and latency, and reports the queue and the running batch, in Prometheus' text format.
- Reload keeps every request: requests in flight finish on the model that started them (the
  scheduler keeps one running batch per model until it empties); a checkpoint that fails to
  load is a 400 and the old model keeps serving.
- Limits: an optional API key (--api_key or $NANOFM_API_KEY) on /v1 and /admin, a body size
  (413), a cap on max_tokens (400), and a cap on requests in flight (429), checked before any
  work is queued.
- The edge export: --int8 quantizes the weights at load (int8 weight-only, per-channel scales;
  nanofm/quantize.py), and a checkpoint exported with `python -m nanofm.quantize` loads as int8
  by itself: about 4x less memory for the weights, for CPUs and small devices.
- Images: a message's content may be OpenAI's list of parts, {"type": "text", "text"} and
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}; a vision-language
  checkpoint (train_vision.py --task=chat) reads them, any other answers 400. Only data URLs are
  read (the server fetches nothing); an image that does not decode is a 400 naming the problem.
  The log keeps an image as {"type": "image", "hash", "width", "height"}, never its bytes.
- Speed: `python bench.py generate` (the engine vs transformers' generate) and
  `python bench.py serve` (64 concurrent streaming clients against this server vs one by one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Union

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, Field, field_validator  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from nanofm import chat, images, quantize  # noqa: E402
from nanofm.checkpoint import load_for_inference, resolve  # noqa: E402
from nanofm.common import ConfigError, NanofmError, pick_device, run_cli  # noqa: E402
from nanofm.config import parse_config  # noqa: E402
from nanofm.engine import Engine, SamplingParams  # noqa: E402
from nanofm.interactions import InteractionLog, LogError  # noqa: E402
from nanofm.scheduler import Scheduler  # noqa: E402


PAGE = ROOT / "web" / "chat.html"  # the chat page at /


@dataclass
class ServeConfig:
    ckpt: str = "out/sft"  # the checkpoint or run directory to serve
    name: str = ""  # the model's name in the API; "" = the run directory's name
    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: only behind an API key and a proxy
    port: int = 8000
    slots: int = 16  # requests decoded together (the running batch)
    device: str = "auto"  # auto | cpu | cuda | mps
    log: str = "out/serve/interactions.db"  # the interaction log: an SQLite file, or a postgresql:// URL; "" = none
    api_key: str = ""  # required as "Authorization: Bearer KEY" on /v1 and /admin; "" = $NANOFM_API_KEY, else none
    max_body_bytes: int = 4_000_000  # larger request bodies get a 413 (an image as a data URL is a third larger than its file)
    max_tokens_limit: int = 0  # the largest max_tokens a request may ask for; 0 = the context
    max_pending: int = 256  # requests running or waiting; more get a 429
    watch: bool = False  # reload when --ckpt (a run directory) gets a new latest checkpoint
    watch_seconds: float = 10.0  # how often --watch looks
    int8: bool = False  # quantize the weights to int8 at load (nanofm.quantize; an int8 export needs no flag)
    compile: str = "auto"  # auto | true | false: decode steps through torch.compile (auto: on CUDA, with CUDA graphs)


# ------------------------------------------------------------------ request shapes (OpenAI's)

class Sampling(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False


class CompletionRequest(Sampling):
    prompt: str = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(..., min_length=1)  # a data URL: data:image/png;base64,...
    detail: Optional[str] = None  # OpenAI's resolution hint; accepted and ignored (the model has one input size)


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]]]


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)


class Feedback(BaseModel):
    request_id: str = Field(..., min_length=1, max_length=200)
    rating: Union[Literal["up", "down"], int]  # thumbs up/down, or 1..5 stars
    comment: Optional[str] = Field(None, max_length=4000)

    @field_validator("rating")
    @classmethod
    def _stars(cls, value):
        if isinstance(value, int) and not 1 <= value <= 5:
            raise ValueError("a rating is 'up', 'down' or 1..5")
        return value


class Reload(BaseModel):
    ckpt: str = Field(..., min_length=1)  # a checkpoint or run directory


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


@dataclass
class Limits:
    """What one client may ask of the server (ServeConfig's flags)."""
    api_key: str = ""
    max_body_bytes: int = 4_000_000
    max_tokens_limit: int = 0
    max_pending: int = 256


# ------------------------------------------------------------------ /metrics (Prometheus text format)

class Metrics:
    """Counters and histograms in Prometheus' text exposition format, written out by hand (a
    dozen lines; the format is the lesson, a client library would hide it)."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
        self.tokens = {"prompt": 0, "completion": 0}
        self.latency = {"count": 0, "sum": 0.0, "buckets": [0] * len(self.BUCKETS)}

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        if path.startswith("/v1/") and path.endswith("completions"):
            self.latency["count"] += 1
            self.latency["sum"] += seconds
            for i, bound in enumerate(self.BUCKETS):
                self.latency["buckets"][i] += seconds <= bound

    def render(self, scheduler_stats: dict) -> str:
        lines = ["# HELP nanofm_requests_total HTTP requests by path and status.", "# TYPE nanofm_requests_total counter"]
        lines += [f'nanofm_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
        lines += ["# HELP nanofm_tokens_total Tokens read (prompt) and written (completion).",
                  "# TYPE nanofm_tokens_total counter"]
        lines += [f'nanofm_tokens_total{{kind="{k}"}} {n}' for k, n in self.tokens.items()]
        lines += ["# HELP nanofm_request_latency_seconds Time from a completion request to its last byte.",
                  "# TYPE nanofm_request_latency_seconds histogram"]
        lines += [f'nanofm_request_latency_seconds_bucket{{le="{b}"}} {n}' for b, n in zip(self.BUCKETS, self.latency["buckets"])]
        lines += [f'nanofm_request_latency_seconds_bucket{{le="+Inf"}} {self.latency["count"]}',
                  f'nanofm_request_latency_seconds_sum {self.latency["sum"]:.6f}',
                  f'nanofm_request_latency_seconds_count {self.latency["count"]}']
        lines += ["# HELP nanofm_queue_depth Requests waiting for a slot.", "# TYPE nanofm_queue_depth gauge",
                  f"nanofm_queue_depth {scheduler_stats['waiting']}",
                  "# HELP nanofm_running_batch_size Requests in the running batch.", "# TYPE nanofm_running_batch_size gauge",
                  f"nanofm_running_batch_size {scheduler_stats['running']}"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the app

def make_app(engine: Engine, name: str, chat_format: str | None, slots: int = 16, log: InteractionLog | None = None,
             checkpoint: str | None = None, load: Callable[[str], tuple[Engine, dict, str]] | None = None,
             limits: Limits | None = None, watch: str | None = None, watch_seconds: float = 10.0) -> FastAPI:
    """The API for one engine; `log` (an InteractionLog) keeps every request and rating; `load`
    turns a checkpoint path into (engine, meta, resolved path) for POST /admin/reload; `watch` (a
    run directory) is checked every watch_seconds, and a new `latest` checkpoint there is loaded."""
    scheduler = Scheduler(engine, slots=slots)
    # what is served now; a reload replaces it whole, and a request keeps the one it started with
    current = {"engine": engine, "chat_format": chat_format, "checkpoint": checkpoint}
    limits = limits or Limits()
    in_flight = [0]  # rows admitted and not yet answered (touched on the event loop's thread only: no lock)

    async def watch_latest():
        """Reload when the watched run directory's newest checkpoint changes (a retrained model
        promoted by monitor.py). A checkpoint that fails to load is reported and skipped."""
        while True:
            await asyncio.sleep(watch_seconds)
            try:
                newest = str(resolve(watch))
            except NanofmError:
                continue  # nothing complete there yet
            if newest != current["checkpoint"] and newest not in failed:
                try:
                    await swap_to(newest)
                    print(f"serve: now serving {newest}", flush=True)
                except APIError as exc:
                    failed.add(newest)
                    print(f"serve: {exc.message}", flush=True)

    failed: set[str] = set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.create_task(watch_latest()) if watch else None
        yield
        if watcher is not None:
            watcher.cancel()
        scheduler.close()  # the decode thread stops with the server
        if log is not None:
            log.close()

    app = FastAPI(title="nanofm", description="OpenAI-compatible API for a nanofm checkpoint", lifespan=lifespan)
    app.state.scheduler = scheduler
    metrics = Metrics()
    created = int(time.time())

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        response = _refuse(request) or await call_next(request)
        if isinstance(response, StreamingResponse):  # a stream's latency ends with its last event
            body = response.body_iterator

            async def timed():
                try:
                    async for part in body:
                        yield part
                finally:
                    metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
            response.body_iterator = timed()
        else:
            metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    def _refuse(request: Request):
        """The checks every request passes before its body is read: the API key and the body size."""
        path = request.url.path
        if limits.api_key and (path.startswith("/v1/") or path.startswith("/admin/")):
            if request.headers.get("authorization", "") != f"Bearer {limits.api_key}":
                return error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)", None,
                                      "invalid_request_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return error_response(413, f"the request body is larger than {limits.max_body_bytes:,} bytes")
        if length is None and request.method == "POST" and "chunked" in request.headers.get("transfer-encoding", ""):
            return error_response(411, "send a Content-Length (chunked request bodies are not accepted)")
        return None

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")  # read each time: edit the page, reload the browser

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return metrics.render(scheduler.stats)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # a body that is not JSON, an unknown path
        message = exc.detail if isinstance(exc.detail, str) else "invalid request"
        if exc.status_code == 400:
            message += " (the body must be UTF-8 JSON)"
        return error_response(exc.status_code, message)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name, "checkpoint": current["checkpoint"], "chat": bool(current["chat_format"]),
                "quantization": quantize.METHOD if quantize.is_quantized(current["engine"].model) else None,
                **scheduler.stats}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "nanofm"}]}

    def check_model(body: Sampling) -> None:
        if body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")

    def sampling(body: Sampling, index: int, engine: Engine) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: at most 4 non-empty strings", "stop")
        seed = None if body.seed is None else body.seed + index
        return SamplingParams(max_tokens=body.max_tokens or engine.model.cfg.block_size, temperature=body.temperature,
                              top_p=None if body.top_p >= 1 else body.top_p, top_k=body.top_k, seed=seed, stop=stop)

    def rows_for(body: Sampling, prompt_ids: list[int], engine: Engine, pictures=None):
        try:
            return [engine.new_row(prompt_ids, sampling(body, i, engine), images=pictures) for i in range(body.n)]
        except NanofmError as exc:  # the prompt does not fit the context, or bad settings
            raise APIError(400, str(exc), "prompt") from None

    def usage(rows, completions) -> dict:
        prompt = rows[0].prompt_len
        generated = sum(len(c.token_ids) for c in completions if c is not None)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def log_cancelled(*args) -> None:
        """log_request for a request that ended early (a client gone, an error), where there is no
        one left to answer: a log that is down is reported, not raised."""
        try:
            log_request(*args)
        except LogError as exc:
            print(f"warning: a cancelled request was not logged: {exc}", file=sys.stderr)

    def log_request(rid, endpoint, body: Sampling, prompt, rows, texts, completions, started, finish, checkpoint) -> None:
        """One row per request, committed before the client sees the end of its answer."""
        counts = usage(rows, completions)
        metrics.tokens["prompt"] += counts["prompt_tokens"]
        metrics.tokens["completion"] += counts["completion_tokens"]
        if log is None:
            return
        settings = body.model_dump(exclude={"model", "prompt", "messages"})
        log.record_request({"id": rid, "created": started, "model": name, "checkpoint": checkpoint, "endpoint": endpoint,
                            "prompt": prompt, "output": texts, "settings": settings,
                            "latency_ms": round(1000 * (time.time() - started), 2),
                            **{k: v for k, v in usage(rows, completions).items() if k != "total_tokens"},
                            "finish_reason": finish})

    async def answer(endpoint: str, body: Sampling, prompt, prompt_ids, served: dict, pictures=None):
        """Submit the n rows of one request to the scheduler and answer: a JSON body, or a stream
        of server-sent events (every row's deltas as they come, index = the row, then [DONE]).
        Each row's events arrive on an asyncio queue fed from the scheduler's thread; a client
        that goes away cancels its rows (their slots are free at the next step). The endpoint has
        checked the model name."""
        started = time.time()
        engine, checkpoint = served["engine"], served["checkpoint"]
        limit = limits.max_tokens_limit or engine.model.cfg.block_size
        if body.max_tokens is not None and body.max_tokens > limit:
            raise APIError(400, f"max_tokens is {body.max_tokens}, the most this server allows is {limit}", "max_tokens")
        if in_flight[0] + body.n > limits.max_pending:
            raise APIError(429, f"{in_flight[0]} requests are in flight (the limit is {limits.max_pending}); retry later",
                           kind="rate_limit_error")
        rows = rows_for(body, prompt_ids, engine, pictures)
        in_flight[0] += len(rows)
        released = []

        def release() -> None:  # once, whichever way the request ends (answered, failed, client gone)
            if not released:
                released.append(True)
                in_flight[0] -= len(rows)

        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        queues = []
        for row in rows:
            q: asyncio.Queue = asyncio.Queue()
            scheduler.submit(row, lambda d, c, e, q=q: loop.call_soon_threadsafe(q.put_nowait, (d, c, e)), engine)
            queues.append(q)
        texts, completions = [""] * len(rows), [None] * len(rows)
        envelope = {"id": rid, "object": "chat.completion" if endpoint == "chat" else "text_completion",
                    "created": int(started), "model": name}

        async def events():
            """(row index, delta, completion) as they come, until every row has finished."""
            pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
            try:
                while pending:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        i = pending.pop(task)
                        delta, completion, error = task.result()
                        if error:
                            raise APIError(500, error, kind="server_error")
                        texts[i] += delta
                        completions[i] = completion
                        if completion is None:
                            pending[asyncio.ensure_future(queues[i].get())] = i
                        yield i, delta, completion
            finally:
                release()
                for task in pending:
                    task.cancel()
                for i, row in enumerate(rows):
                    if completions[i] is None:
                        scheduler.cancel(row)

        def finish_of(completions) -> str:
            return completions[0].finish_reason if all(completions) else "cancelled"

        if not body.stream:
            try:
                async for _ in events():
                    pass
            finally:
                if not all(completions):  # an error or a client gone: still logged
                    log_cancelled(rid, endpoint, body, prompt, rows, texts, completions, started, "cancelled",
                                  checkpoint)
            try:
                await asyncio.to_thread(log_request, rid, endpoint, body, prompt, rows, texts, completions, started,
                                        finish_of(completions), checkpoint)
            except LogError as exc:  # an answer that cannot be kept is not given: the client retries later
                raise APIError(503, f"{exc}; the reply was not kept, so it is not sent: retry later",
                               kind="server_error") from None
            if endpoint == "chat":
                choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                            "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
            else:
                choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                           for i, c in enumerate(completions)]
            return {**envelope, "choices": choices, "usage": usage(rows, completions)}

        chunk_object = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

        def chunk(i, delta, completion) -> str:
            finish = completion.finish_reason if completion else None
            if endpoint == "chat":
                choice = {"index": i, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**envelope, 'object': chunk_object, 'choices': [choice]})}\n\n"

        async def sse():
            logged = False
            try:
                if endpoint == "chat":  # the first delta of each choice carries the role
                    for i in range(len(rows)):
                        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield f"data: {json.dumps({**envelope, 'object': chunk_object, 'choices': [first]})}\n\n"
                try:
                    async for i, delta, completion in events():
                        if delta or completion is not None:
                            yield chunk(i, delta, completion)
                except APIError as exc:
                    yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
                try:
                    await asyncio.to_thread(log_request, rid, endpoint, body, prompt, rows, texts, completions,
                                            started, finish_of(completions), checkpoint)
                except LogError as exc:  # the text went out already: say that it was not kept
                    yield f"data: {json.dumps({'error': {'message': f'{exc}; this reply was not kept', 'type': 'server_error'}})}\n\n"
                logged = True
                yield "data: [DONE]\n\n"
            finally:
                release()
                if not logged:  # the client went away mid-stream: what it was sent is still logged
                    log_cancelled(rid, endpoint, body, prompt, rows, texts, completions, started, "cancelled",
                                  checkpoint)

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body)
        return await answer("completions", body, body.prompt, body.prompt, dict(current))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body)
        served = dict(current)
        if not served["chat_format"]:
            raise APIError(400, f"{name} is not a chat model (its checkpoint has no chat format); "
                           f"use /v1/completions, or serve a model fine-tuned with train_sft.py", "messages")
        model = served["engine"].model
        try:
            messages, logged = read_messages(body.messages)
            vision = model.vision.cfg if model.cfg.vision is not None else None
            prompt_ids = chat.render_prompt(served["engine"].tokenizer, messages, image_tokens=vision.n_tokens if vision else 0)
        except NanofmError as exc:
            raise APIError(400, str(exc), "messages") from None
        pictures = chat.images_of(messages)
        pictures = images.to_tensor([{"image": p} for p in pictures], vision.image_size) if pictures else None
        return await answer("chat", body, logged, prompt_ids, served, pictures)

    def read_messages(messages: list[Message]) -> tuple[list[dict], list[dict]]:
        """(messages for the chat format, with images decoded; the same for the log, each image as
        its hash and size). ImageError for an image that is not a readable data URL."""
        decoded, logged = [], []
        for m in messages:
            if isinstance(m.content, str):
                decoded.append({"role": m.role, "content": m.content})
                logged.append({"role": m.role, "content": m.content})
                continue
            parts, kept = [], []
            for part in m.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    kept.append({"type": "text", "text": part.text})
                else:
                    pixels = images.decode(images.from_data_url(part.image_url.url), what="the image")
                    parts.append({"type": "image", "image": pixels})
                    kept.append({"type": "image", "hash": images.pixel_hash(pixels), "width": pixels.shape[1],
                                 "height": pixels.shape[0]})
            decoded.append({"role": m.role, "content": parts})
            logged.append({"role": m.role, "content": kept})
        return decoded, logged

    @app.post("/admin/reload")
    async def reload(body: Reload):
        """Serve another checkpoint (monitoring promotes a retrained model here). Requests in
        flight finish on the old model; a checkpoint that fails to load changes nothing."""
        return {"ok": True, "model": name, "checkpoint": await swap_to(body.ckpt)}

    async def swap_to(ckpt: str) -> str:
        if load is None:
            raise APIError(400, "this server was started without a checkpoint loader", "ckpt")
        try:
            new_engine, meta, path = await asyncio.to_thread(load, ckpt)
        except (NanofmError, OSError, RuntimeError, ValueError) as exc:
            raise APIError(400, f"could not load {ckpt}: {exc}; still serving {current['checkpoint']}", "ckpt") from None
        scheduler.swap(new_engine)
        current.update(engine=new_engine, chat_format=meta.get("chat_format"), checkpoint=path)
        return path

    @app.post("/v1/feedback")
    async def feedback(body: Feedback):
        if log is None:
            raise APIError(400, "this server keeps no interaction log (started with --log='')", "request_id")
        rating = {"up": 1, "down": -1}.get(body.rating, body.rating)
        try:
            known = await asyncio.to_thread(log.record_feedback, body.request_id, rating, body.comment,
                                            "thumbs" if body.rating in ("up", "down") else "stars")
        except LogError as exc:
            raise APIError(503, f"{exc}; the rating was not kept: retry later", kind="server_error") from None
        if not known:
            raise APIError(404, f"no request with id {body.request_id!r} in the log", "request_id")
        return {"ok": True, "request_id": body.request_id, "rating": rating}

    return app


def load_app(cfg: ServeConfig) -> FastAPI:
    if cfg.compile not in ("auto", "true", "false"):
        raise ConfigError(f"--compile must be auto, true or false, not {cfg.compile!r}")
    device = pick_device(cfg.device)

    def load(path: str) -> tuple[Engine, dict, str]:
        model, meta, tokenizer = load_for_inference(path, device)
        if cfg.int8 and not quantize.is_quantized(model):  # reloads are quantized too
            model = quantize.quantize_model(model)
        engine = Engine(model, tokenizer, device=device, batch_size=cfg.slots,
                        compile=cfg.compile == "true" or (cfg.compile == "auto" and str(device).startswith("cuda")))
        if engine.decode is not None:  # compile now, not during the first user's request
            engine.generate([[tokenizer.bos_id]] * cfg.slots, SamplingParams(max_tokens=2, temperature=0))
        return engine, meta, str(resolve(path))

    engine, meta, path = load(cfg.ckpt)
    name = cfg.name or resolve(cfg.ckpt).parent.name
    log = InteractionLog(cfg.log) if cfg.log else None
    limits = Limits(cfg.api_key or os.environ.get("NANOFM_API_KEY", ""), cfg.max_body_bytes, cfg.max_tokens_limit,
                    cfg.max_pending)
    return make_app(engine, name, meta.get("chat_format"), cfg.slots, log, path, load, limits,
                    watch=cfg.ckpt if cfg.watch else None, watch_seconds=cfg.watch_seconds)


def main(argv=None) -> None:
    import uvicorn
    cfg = parse_config(ServeConfig, argv, description=__doc__.split("\n\n")[0])
    app = load_app(cfg)
    print(f"serving {cfg.ckpt} on http://{cfg.host}:{cfg.port} (OpenAI API under /v1)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
