"""The HTTP side of `tinyvlm serve`: a FastAPI app with OpenAI's chat-completions routes, and `run`.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions`` (a JSON answer, or
server-sent events with ``stream: true``), ``GET /health`` (the queue and batch counters).

Every error is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``: bad input 400,
unknown model 404 (as OpenAI and vLLM answer it), a too large image or body 413, a full queue 429; an
unexpected failure is a 500 with the same body, its traceback in the server's log only. A request is checked
completely (JSON, fields, images, prompt length, sampling values) before it is queued, so a bad request never
reaches the model and never fails a batch it would have shared.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tinyvlm.errors import ConfigError, TinyVLMError
from tinyvlm.generation import SamplingConfig
from tinyvlm.serve.config import ServeConfig
from tinyvlm.serve.engine import Done, Engine, Failed, Job, Piece
from tinyvlm.serve.images import ImageLimits, read_image
from tinyvlm.serve.protocol import (
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    models_body,
    parse_request,
    to_prompt,
    usage,
)

if TYPE_CHECKING:
    import uvicorn

    from tinyvlm.vlm.model import VLM

#: OpenAI's names of the sampling fields, where tinyvlm's differ.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}


def create_app(vlm: "VLM", name: str, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``vlm`` (prepared for inference) under the model id ``name``. The model's
    worker thread starts and stops with the app (its lifespan)."""
    config = config or ServeConfig()
    engine = Engine(vlm, max_batch=config.max_batch, max_queue=config.max_queue, batch_wait=config.batch_wait_ms / 1000)
    limits = ImageLimits(config.max_image_bytes, config.max_image_pixels, config.image_fetch_timeout)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="tinyvlm", summary=f"OpenAI-compatible chat completions for {name}", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:  # Starlette re-raises it: logged
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}: {error}"), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_body(name, started)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, name)
        return models_body(name, started)["data"][0]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, **engine.status()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        chat = parse_request(await read_json(request, config.max_body_bytes))
        check_model(chat.model, name)
        job = await prepare(chat, engine, limits, config)
        engine.submit(job)
        if chat.stream:
            return StreamingResponse(stream_events(job, chat, engine, name), media_type="text/event-stream")
        answer = asyncio.ensure_future(collect(job))
        left = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait((answer, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            engine.cancel(job)  # no-op once answered; drops the request or stops its row if the client left
        if not answer.done():  # the client left: nobody reads an answer
            answer.cancel()
            return JSONResponse(error_body(499, "the client closed the connection"), status_code=499)
        text, done = answer.result()
        return completion_body(
            completion_id(), name, text, done.finish_reason, job.prompt_tokens, done.completion_tokens
        )

    return app


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, at most ``limit`` bytes (413 past it, 400 when not JSON)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, more than this server reads ({limit})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is more than this server reads ({limit} bytes)")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"the model {requested!r} does not exist here; this server runs {served!r}", param="model")


async def prepare(chat: ChatRequest, engine: Engine, limits: ImageLimits, config: ServeConfig) -> Job:
    """Everything checked before the request is queued: images (fetched and decoded in threads), the prompt
    (image count, context length), the answer limit and the sampling values."""
    prompt, urls = to_prompt(chat.messages)
    if len(urls) > config.max_images:
        raise APIError(
            400, f"too many images: {len(urls)} in this request, this server takes at most {config.max_images} "
            "(--max-images)", param="messages",
        )
    images = list(await asyncio.gather(*(asyncio.to_thread(read_image, url, limits, param) for url, param in urls)))
    try:
        prompt_tokens = await asyncio.to_thread(engine.count_prompt, prompt, images)
    except TinyVLMError as error:
        raise APIError(400, str(error), param="messages") from None
    room = engine.context - prompt_tokens
    limit = chat.answer_limit
    context = f"the model's context is {engine.context} tokens and the prompt takes {prompt_tokens} (images included)"
    if room < 1:
        raise APIError(400, f"{context}, leaving no room for an answer; shorten the prompt", param="messages")
    if limit is not None and limit > room:
        raise APIError(
            400, f"{context}, leaving {room} for the answer, but max_tokens is {limit}; lower it or shorten the "
            "prompt", param="max_tokens",
        )
    values = dict(
        max_new_tokens=room if limit is None else limit,
        temperature=0.0 if chat.temperature is None else chat.temperature,
        top_k=chat.top_k, top_p=chat.top_p, repetition_penalty=chat.repetition_penalty, seed=chat.seed,
        stop=chat.stop,
    )  # fmt: skip
    return Job(prompt=prompt, images=images, prompt_tokens=prompt_tokens, sampling=sampling_config(values),
               loop=asyncio.get_running_loop())


def sampling_config(values: dict[str, Any]) -> SamplingConfig:
    """tinyvlm's validated `SamplingConfig`; its `ConfigError` is a 400 naming the first bad field in OpenAI's
    words (the field is found by validating each value on its own)."""
    try:
        return SamplingConfig(**values)
    except ConfigError as error:
        field = next((f for f, v in values.items() if not _valid(f, v)), None)
        param = OPENAI_NAMES.get(field or "", field)
        message = str(error)
        for ours, theirs in OPENAI_NAMES.items():
            message = message.replace(ours, theirs)
        raise APIError(400, message, param=param) from None


def _valid(field: str, value: Any) -> bool:
    try:
        SamplingConfig(**{field: value})
        return True
    except ConfigError:
        return False


async def collect(job: Job) -> tuple[str, Done]:
    """The whole answer of a non-streamed request."""
    pieces = []
    while True:
        event = await job.events.get()
        if isinstance(event, Piece):
            pieces.append(event.text)
        elif isinstance(event, Done):
            return "".join(pieces), event
        else:
            raise event.error


async def stream_events(job: Job, chat: ChatRequest, engine: Engine, name: str) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the role first, then content deltas, then an empty delta
    with the finish reason; with ``stream_options.include_usage`` a last chunk without choices carries the
    usage. ``data: [DONE]`` ends the stream. An error after the stream has begun is sent as an error event
    (the openai client raises it). The client leaving cancels this generator, which stops the row."""
    answer_id, created = completion_id(), int(time.time())
    with_usage = chat.include_usage

    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(**fields: Any) -> str:
        return event(chunk_body(answer_id, name, created, with_usage_field=with_usage, **fields))

    try:
        yield chunk(delta={"role": "assistant", "content": ""})
        while True:
            item = await job.events.get()
            if isinstance(item, Piece):
                yield chunk(delta={"content": item.text})
            elif isinstance(item, Done):
                yield chunk(delta={}, finish_reason=item.finish_reason)
                if with_usage:
                    yield chunk(usage=usage(job.prompt_tokens, item.completion_tokens))
                break
            else:
                assert isinstance(item, Failed)
                yield event(item.error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)


def run(vlm: "VLM", name: str, config: ServeConfig | None = None) -> None:
    """Serve ``vlm`` with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    config = config or ServeConfig()
    server = uvicorn.Config(create_app(vlm, name, config), host=config.host, port=config.port, log_level="info")
    sock = listening_socket(server)  # bound here, so that the address printed is the real one (port 0: any free port)
    host, port = sock.getsockname()[:2]
    print(f"tinyvlm serve: {name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.Server(server).run(sockets=[sock])


def listening_socket(server: "uvicorn.Config") -> socket.socket:
    """The socket of a ``uvicorn.Config``, bound, with ``TCP_NODELAY``, which the connections it accepts
    inherit (Linux, BSD). Without it the headers and the body of an answer go out as two small writes, and
    the second waits for the client's delayed acknowledgement of the first: 40 ms per request."""
    sock = server.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
