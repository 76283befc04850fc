"""OpenAI-compatible HTTP API over an ``Engine``: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/responses.

A request body must be ``application/json`` (415 otherwise: a browser can send ``text/plain``
cross-site without a preflight) and is validated with bounded work before anything is rendered
(body size, JSON depth, message count, prompt characters). Rendering, tokenization and grammar
compilation run in a worker thread, so ``/health`` and other clients stay responsive. Then it is
admitted: at most ``max_concurrency`` requests generate and at most ``max_queue`` wait (FIFO);
anything beyond gets 429 at once rather than hanging. An admitted request runs ``engine.stream``
in a worker thread and hands text deltas to the loop through an ``asyncio.Queue``. A client
that goes away -- while queued, while streaming, or while waiting for a non-streamed answer --
sets its job's cancel flag: the token loop stops within one token, and the slot is freed when the
worker thread returns, never earlier, so the next request does not queue behind a ghost.

With ``max_concurrency`` > 1 the HF engine batches the generating requests continuously
(``generation.batch``): each keeps its own adapter, stops, sampling settings and grammar. Beam
search and the llama.cpp backend run one request at a time under the engine lock. On SIGTERM
(``drain``) every generation stops and open streams end with an error event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.templates import PromptTemplate, TemplateError
from ..generation.constrain import ConstraintError
from .native_tools import native_format, native_prompt, wants_native
from .replies import Reply, ResponsesReply
from .responses import EmbeddingRequest, ResponsesRequest, chat_body
from .runtime import (  # noqa: F401 - Admission, Task: part of this module's interface
    Admission,
    ClientGone,
    EventStream,
    Job,
    Server,
    Task,
    plan,
    wait_disconnect,
)
from .schemas import (
    MAX_N,
    APIError,
    ChatRequest,
    CompletionRequest,
    check_unsupported,
    constraint,
    gen_args,
    max_new_tokens,
    parse_body,
    prompt_ids,
    to_conversation,
)

MAX_BODY_BYTES = 1 << 20
_RAW = PromptTemplate()
"""Text completions have no template, so none of its stop strings apply."""


async def _respond(request: Request, job: Job, reply: Reply | ResponsesReply, stream: bool) -> Any:
    """The SSE stream, or the whole response -- cancelling the job if the client leaves meanwhile."""
    if stream:
        return EventStream(reply.stream(aiter(job)), job)
    gone = asyncio.ensure_future(wait_disconnect(request))
    gone.add_done_callback(lambda f: f.cancelled() or job.cancel())
    try:
        return await reply.collect(aiter(job))
    finally:
        gone.cancel()
        job.cancel()  # a no-op when it finished; stops it when this handler is cancelled (shutdown)


def _chat_prompt(engine, req: ChatRequest, cons) -> tuple[list[int], str, Any]:
    """Prompt ids, assistant prefill and constraint of a chat request, its grammar compiled (a worker thread).

    A request involving tools is rendered by the model's own chat template when that template
    supports tools in a call format we recognise (``native_tools``); otherwise, and for every
    other request, through the template's segments with our own tool prompt.
    """
    tmpl = engine.template
    fmt = native_format(tmpl) if wants_native(req) else None
    if fmt is not None:
        ids, prefill, cons = native_prompt(engine, req, fmt, cons)
    else:
        tools = cons.tools if cons is not None and cons.kind == "tools" else ()
        default_system = tmpl.system_prompt or getattr(tmpl, "default_system", "")
        conv, prefill = to_conversation(req.messages, tools, default_system)
        try:
            ids = engine.prompt_ids(conv, prefill=prefill)
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from None
    _check_constraint(engine, req, cons)
    return ids, prefill, cons


def _check_constraint(engine, req, cons) -> None:
    if cons is None:
        return
    try:
        engine.check_constraint(cons)
    except ConstraintError as e:
        if cons.kind == "tools":
            raise APIError(400, f"tools: a function's parameters cannot be compiled: {e}", param="tools") from None
        param = "response_format.json_schema.schema" if cons.schema is not None else "response_format"
        raise APIError(400, f"{param}: the schema cannot be enforced: {e}", param=param) from None


def _message_chars(req: ChatRequest) -> int:
    total = 0
    for m in req.messages:
        c = m.content
        total += len(c) if isinstance(c, str) else sum(len(str(p.get("text", ""))) for p in c or [])
        total += sum(len(t.function.arguments) for t in m.tool_calls or [])
    return total + sum(len(json.dumps(t.model_dump())) for t in req.tools or [])


def _encode_vector(vec: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
    return vec


def create_app(
    engine,
    *,
    api_key: str | None = None,
    max_concurrency: int = 1,
    max_queue: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (base model + adapters, each a ``model`` name).

    ``cors_origins``: browser origins allowed to call the API (none by default; ``*`` for any).
    """
    server = Server(engine, api_key=api_key, max_concurrency=max_concurrency, max_queue=max_queue,
                    max_body_bytes=max_body_bytes)
    if max_concurrency > 1 and engine.batcher is None:
        engine.enable_batching(max_concurrency)  # concurrent requests decode together

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.drain()
        server.pool.shutdown(wait=False, cancel_futures=True)
        server.prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="chinese-vicuna", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    add_error_handlers(app)
    for router in (health_router(server), models_router(server), chat_router(server), completions_router(server),
                   embeddings_router(server)):
        app.include_router(router)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error body: ours, Starlette's (404, 405), a client gone, a crash."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        body = APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)


def health_router(server: Server) -> APIRouter:
    """``GET /health`` (no key needed: load balancers and the tests poll it)."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return server.health()

    return router


def models_router(server: Server) -> APIRouter:
    """``GET /v1/models`` and ``GET /v1/models/{model}``: the base model and each adapter."""
    router = APIRouter()

    @router.get("/v1/models")
    async def models(request: Request) -> dict:
        server.authorize(request)
        return {"object": "list", "data": server.model_cards()}

    @router.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict:
        server.authorize(request)
        want = server.adapter_for(model) or server.engine.name
        return next(c for c in server.model_cards() if c["id"] == want)

    return router


def chat_router(server: Server) -> APIRouter:
    """``POST /v1/chat/completions`` and ``POST /v1/responses``: both render messages through the template."""
    router = APIRouter()
    engine = server.engine

    async def chat_job(request: Request, req: ChatRequest) -> tuple[Job, list[int], str, Any]:
        adapter = server.adapter_for(req.model)
        check_unsupported(req)
        cons = constraint(req)
        server.check_prompt_size(_message_chars(req), "messages")
        ids, prefill, cons = await server.prepare(_chat_prompt, engine, req, cons)
        gen = gen_args(req, max_new_tokens(req, len(ids), engine.context_length, "messages"), engine.vocab_size, cons)
        job = Job(engine, plan([ids], gen, req.choices), adapter=adapter, stops=req.stop_strings(), template=None,
                  server=server)
        await server.launch(request, job)
        return job, ids, prefill, cons

    @router.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        server.authorize(request)
        req = parse_body(ChatRequest, await server.read_json(request))
        job, ids, prefill, cons = await chat_job(request, req)
        tools = cons.format if cons is not None and cons.kind == "tools" else None
        reply = Reply(req, len(ids), chat=True, prefixes=[""] * req.choices, tools=tools, strip=not prefill)
        return await _respond(request, job, reply, req.stream)

    @router.post("/v1/responses")
    async def responses(request: Request) -> Any:
        server.authorize(request)
        rreq = parse_body(ResponsesRequest, await server.read_json(request))
        req = parse_body(ChatRequest, chat_body(rreq))
        job, ids, prefill, cons = await chat_job(request, req)
        tools = cons.format if cons is not None and cons.kind == "tools" else None
        reply = ResponsesReply(req.model, len(ids), tools=tools, strip=not prefill, instructions=rreq.instructions,
                               max_output_tokens=rreq.max_output_tokens)
        return await _respond(request, job, reply, rreq.stream)

    return router


def completions_router(server: Server) -> APIRouter:
    """``POST /v1/completions``: raw text prompts, no template."""
    router = APIRouter()
    engine = server.engine

    @router.post("/v1/completions")
    async def completions(request: Request) -> Any:
        server.authorize(request)
        req = parse_body(CompletionRequest, await server.read_json(request))
        adapter = server.adapter_for(req.model)
        check_unsupported(req)
        cons = constraint(req)
        texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
        server.check_prompt_size(sum(map(len, texts)), "prompt")
        prompts = await server.prepare(prompt_ids, engine, req.prompt)
        if len(prompts) * req.choices > 8 * MAX_N:
            raise APIError(400, f"At most {8 * MAX_N} choices (prompts x n) per request.", param="prompt")
        await server.prepare(_check_constraint, engine, req, cons)
        # OpenAI's default max_tokens for text completions is 16.
        limit = max_new_tokens(req, max(len(ids) for _, ids in prompts), engine.context_length, "prompt", default=16)
        gen = gen_args(req, limit, engine.vocab_size, cons)
        job = Job(engine, plan([ids for _, ids in prompts], gen, req.choices), adapter=adapter,
                  stops=req.stop_strings(), template=_RAW, server=server)
        await server.launch(request, job)
        prefixes = [text if req.echo else "" for text, _ in prompts for _ in range(req.choices)]
        reply = Reply(req, sum(len(ids) for _, ids in prompts), chat=False, prefixes=prefixes)
        return await _respond(request, job, reply, req.stream)

    return router


def embeddings_router(server: Server) -> APIRouter:
    """``POST /v1/embeddings``: ``engine.embed`` of the base model or an adapter."""
    router = APIRouter()
    engine = server.engine

    @router.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        server.authorize(request)
        req = parse_body(EmbeddingRequest, await server.read_json(request))
        adapter = server.adapter_for(req.model)
        inputs = req.inputs(len(engine.tokenizer))
        server.check_prompt_size(max((len(x) for x in inputs if isinstance(x, str)), default=0), "input")
        width = getattr(getattr(engine.model, "config", None), "hidden_size", None)
        if req.dimensions is not None and width and req.dimensions != width:
            raise APIError(400, f"dimensions: this model's embeddings have {width} dimensions.", param="dimensions")
        try:
            vectors, tokens = await server.exclusive(request, engine.embed, inputs, adapter)
        except Exception as e:  # the llama.cpp backend has no embeddings: say so
            from ..config import ConfigError

            if isinstance(e, ConfigError):
                raise APIError(400, str(e), param="model") from None
            raise
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router
