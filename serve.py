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
- GET  /health                    ok, and what is loaded;
both POSTs with or without streaming (server-sent events, `data: {json}` chunks, the first
chat delta carrying the role, then `data: [DONE]`), with temperature, top_p, top_k, max_tokens,
stop, seed and n, finish_reason stop/length, and usage.

Design decisions:
- The request and response shapes follow OpenAI's (REFERENCES.md), so the official `openai`
  client works unchanged (tested against a real server on 127.0.0.1).
- Bad input gets a 400 with OpenAI's error body ({"error": {"message", "type", "param", "code"}}),
  never a 500: pydantic checks the shapes and ranges, the engine the prompt's length.
- Binds 127.0.0.1 unless --host says otherwise.
- Not here yet (issue 13 goes on): the interaction log, /metrics, feedback, reload, the web page,
  limits and API keys, the int8 export.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from nanofm import chat  # noqa: E402
from nanofm.checkpoint import load_for_inference, resolve  # noqa: E402
from nanofm.common import NanofmError, pick_device, run_cli  # noqa: E402
from nanofm.config import parse_config  # noqa: E402
from nanofm.engine import Engine, SamplingParams  # noqa: E402
from nanofm.scheduler import Scheduler  # noqa: E402


@dataclass
class ServeConfig:
    ckpt: str = "out/sft"  # the checkpoint or run directory to serve
    name: str = ""  # the model's name in the API; "" = the run directory's name
    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: only behind an API key and a proxy
    port: int = 8000
    slots: int = 16  # requests decoded together (the running batch)
    device: str = "auto"  # auto | cpu | cuda | mps


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


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


# ------------------------------------------------------------------ the app

def make_app(engine: Engine, name: str, chat_format: str | None, slots: int = 16) -> FastAPI:
    scheduler = Scheduler(engine, slots=slots)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()  # the decode thread stops with the server

    app = FastAPI(title="nanofm", description="OpenAI-compatible API for a nanofm checkpoint", lifespan=lifespan)
    app.state.scheduler = scheduler
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name, "chat": bool(chat_format), **scheduler.stats}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "nanofm"}]}

    def check_model(body: Sampling) -> None:
        if body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")

    def sampling(body: Sampling, index: int) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: at most 4 non-empty strings", "stop")
        seed = None if body.seed is None else body.seed + index
        return SamplingParams(max_tokens=body.max_tokens or engine.model.cfg.block_size, temperature=body.temperature,
                              top_p=None if body.top_p >= 1 else body.top_p, top_k=body.top_k, seed=seed, stop=stop)

    def rows_for(body: Sampling, prompt_ids: list[int]):
        try:
            return [engine.new_row(prompt_ids, sampling(body, i)) for i in range(body.n)]
        except NanofmError as exc:  # the prompt does not fit the context, or bad settings
            raise APIError(400, str(exc), "prompt") from None

    async def run(rows) -> list:
        """Submit the rows and collect each one's events: an asyncio queue per row, fed from the
        scheduler's thread."""
        loop = asyncio.get_running_loop()
        queues = []
        for row in rows:
            q: asyncio.Queue = asyncio.Queue()
            scheduler.submit(row, lambda d, c, e, q=q: loop.call_soon_threadsafe(q.put_nowait, (d, c, e)))
            queues.append(q)
        return queues

    async def complete(rows, request: Request) -> list:
        queues = await run(rows)
        completions = []
        try:
            for q in queues:
                while True:
                    delta, completion, error = await q.get()
                    if error:
                        raise APIError(500, error, kind="server_error")
                    if completion is not None:
                        completions.append(completion)
                        break
        finally:
            for row in rows[len(completions):]:
                scheduler.cancel(row)
        return completions

    def usage(rows, completions) -> dict:
        prompt = rows[0].prompt_len
        generated = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    async def stream(rows, request: Request, make_chunk):
        """Server-sent events: every row's deltas as they come (index = the row), then [DONE].
        A client that goes away cancels its rows (their slots are freed at the next step)."""
        queues = await run(rows)
        pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
        finished = set()
        try:
            if make_chunk.first is not None:
                for i in range(len(rows)):
                    yield f"data: {json.dumps(make_chunk.first(i))}\n\n"
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    delta, completion, error = task.result()
                    if error:
                        yield f"data: {json.dumps({'error': {'message': error, 'type': 'server_error'}})}\n\n"
                        finished.add(i)
                        continue
                    if delta or completion is not None:
                        yield f"data: {json.dumps(make_chunk(i, delta, completion))}\n\n"
                    if completion is None:
                        pending[asyncio.ensure_future(queues[i].get())] = i
                    else:
                        finished.add(i)
            yield "data: [DONE]\n\n"
        finally:
            for task in pending:
                task.cancel()
            for i, row in enumerate(rows):
                if i not in finished:
                    scheduler.cancel(row)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        rows = rows_for(body, body.prompt)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(i, delta, completion):
                return {"id": rid, "object": "text_completion", "created": now, "model": name,
                        "choices": [{"index": i, "text": delta, "logprobs": None,
                                     "finish_reason": completion.finish_reason if completion else None}]}
            chunk.first = None
            return StreamingResponse(stream(rows, request, chunk), media_type="text/event-stream")
        done = await complete(rows, request)
        return {"id": rid, "object": "text_completion", "created": now, "model": name,
                "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                            for i, c in enumerate(done)], "usage": usage(rows, done)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body)
        if not chat_format:
            raise APIError(400, f"{name} is not a chat model (its checkpoint has no chat format); "
                           f"use /v1/completions, or serve a model fine-tuned with train_sft.py", "messages")
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt_ids = chat.render_prompt(engine.tokenizer, messages)
        except NanofmError as exc:
            raise APIError(400, str(exc), "messages") from None
        rows = rows_for(body, prompt_ids)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(i, delta, completion):
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                        "choices": [{"index": i, "delta": {"content": delta} if delta else {},
                                     "finish_reason": completion.finish_reason if completion else None}]}
            chunk.first = lambda i: {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                                     "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]}
            return StreamingResponse(stream(rows, request, chunk), media_type="text/event-stream")
        done = await complete(rows, request)
        return {"id": rid, "object": "chat.completion", "created": now, "model": name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for i, c in enumerate(done)],
                "usage": usage(rows, done)}

    return app


def load_app(cfg: ServeConfig) -> FastAPI:
    device = pick_device(cfg.device)
    model, meta, tokenizer = load_for_inference(cfg.ckpt, device)
    name = cfg.name or resolve(cfg.ckpt).parent.name
    engine = Engine(model, tokenizer, device=device, batch_size=cfg.slots)
    return make_app(engine, name, meta.get("chat_format"), cfg.slots)


def main(argv=None) -> None:
    import uvicorn
    cfg = parse_config(ServeConfig, argv, description=__doc__.split("\n\n")[0])
    app = load_app(cfg)
    print(f"serving {cfg.ckpt} on http://{cfg.host}:{cfg.port} (OpenAI API under /v1)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
