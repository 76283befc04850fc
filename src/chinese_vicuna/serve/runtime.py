"""What the API endpoints run on: admission (slots + FIFO queue), generation jobs in worker
threads, and the shared server state (auth, body reading, bounded checks, drain on shutdown).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..generation.decode import GenArgs, TokenLogprob
from .schemas import APIError

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its request was admitted."""


@dataclass
class Task:
    ids: list[int]
    gen: GenArgs
    indices: list[int]
    """The choices that receive this text (several when deterministic decoding is shared)."""


def plan(prompts: list[list[int]], gen: GenArgs, n: int) -> list[Task]:
    """Generations for ``n`` choices per prompt; choice ``p * n + i`` belongs to prompt ``p``."""
    tasks = []
    for p, ids in enumerate(prompts):
        if not gen.do_sample:  # greedy / beam search: all n choices are the same text; compute it once
            tasks.append(Task(ids, gen, list(range(p * n, p * n + n))))
            continue
        for i in range(n):
            seed = None if gen.seed is None else gen.seed + i
            tasks.append(Task(ids, replace(gen, seed=seed), [p * n + i]))
    return tasks


class Admission:
    """At most ``concurrency`` requests generate and ``queue`` wait (FIFO); beyond that, 429 at once."""

    def __init__(self, concurrency: int, queue: int):
        self.concurrency, self.queue = concurrency, queue
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def enter(self) -> asyncio.Future:
        """A future that is done once the caller holds a slot; raises a 429 APIError if the queue is full."""
        slot = asyncio.get_running_loop().create_future()
        if self.active < self.concurrency and not self.waiting:
            self.active += 1
            slot.set_result(None)
        elif self.waiting >= self.queue:
            raise APIError(
                429,
                f"The server is busy ({self.active} requests generating, {self.waiting} queued, "
                f"max queue {self.queue}). Retry later.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        else:
            self._waiters.append(slot)
        return slot

    def leave(self, slot: asyncio.Future) -> None:
        """Give a held slot back (to the next waiter), or withdraw from the queue."""
        if slot.done() and not slot.cancelled():
            while self._waiters:
                nxt = self._waiters.popleft()
                if not nxt.done():
                    nxt.set_result(None)  # the slot passes on: ``active`` stays the same
                    return
            self.active -= 1
        else:
            slot.cancel()
            if slot in self._waiters:
                self._waiters.remove(slot)


def _token_str(raw: bytes) -> str:
    """A token's text as OpenAI writes it: the text, or ``bytes:\\xe5\\xa4`` for part of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Job:
    """One request's generation: ``run`` in a worker thread; events are read with ``async for``.

    Events: ``("delta", indices, text, logprobs)``, ``("finish", indices, reason, tokens)``,
    ``("error", [], message, status)``.
    """

    def __init__(self, engine, tasks: list[Task], *, adapter: str | None, stops: list[str], template,
                 server: Server | None = None):
        self.engine, self.tasks, self.adapter, self.stops, self.template = engine, tasks, adapter, stops, template
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        self.generated = 0
        self.interrupted = False

    def _entry(self, lp: TokenLogprob) -> dict:
        def one(tok: int, value: float) -> dict:
            raw = self.engine.token_bytes(tok)
            return {"token": _token_str(raw), "logprob": max(value, -9999.0), "bytes": list(raw)}

        return {**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}

    def cancel(self) -> None:
        self._stop.set()

    def _emit(self, event: tuple | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody listens any more
            self._stop.set()

    def run(self) -> None:
        try:
            for task in self.tasks:
                if self._stop.is_set():
                    self.interrupted = True
                    break
                stream = self.engine.stream(
                    task.ids, task.gen, adapter=self.adapter, stop_strings=self.stops,
                    template=self.template, cancel=self._stop.is_set,
                )
                sent = 0
                try:
                    for delta in stream:
                        entries = [self._entry(lp) for lp in stream.logprobs[sent:]]
                        sent += len(entries)
                        self._emit(("delta", task.indices, delta, entries))
                finally:
                    self.generated += stream.completion_tokens
                if stream.finish_reason == "cancelled":
                    self.interrupted = True
                    if self.server is not None and self.server.draining:
                        self._emit(("error", [], "The server is shutting down; retry on another instance.", 503))
                    break
                if rest := [self._entry(lp) for lp in stream.logprobs[sent:]]:
                    self._emit(("delta", task.indices, "", rest))
                self._emit(("finish", task.indices, stream.finish_reason, stream.completion_tokens))
        except Exception as e:
            log.exception("generation failed")
            self._emit(("error", [], f"Generation failed: {type(e).__name__}: {e}", 500))
            raise
        finally:
            self._emit(None)

    async def __aiter__(self) -> AsyncIterator[tuple]:
        while (event := await self.events.get()) is not None:
            yield event


async def wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body is read, so ``receive`` only answers that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """An SSE response that cancels its job however it ends: finished, client gone, or error."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # a no-op when the job already ended


class Server:
    """What the endpoints share: the engine, admission, worker threads and counters."""

    def __init__(self, engine, *, api_key: str | None, max_concurrency: int, max_queue: int, max_body_bytes: int):
        self.engine, self.api_key, self.max_body = engine, api_key, max_body_bytes
        self.admission = Admission(max_concurrency, max_queue)
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="generate")
        # Rendering / tokenizing / grammar compilation: off the event loop, a few at a time.
        self.prep = ThreadPoolExecutor(2, thread_name_prefix="prepare")
        self.jobs: set[Job] = set()
        self.created = int(time.time())
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0}
        self.draining = False
        self._max_token_chars: int | None = None

    def health(self) -> dict:
        status = "draining" if self.draining else "ok"
        return {"status": status, "active": self.admission.active, "waiting": self.admission.waiting, **self.counters}

    def drain(self) -> None:
        """Shutting down (SIGTERM): stop every generation; open streams end with an error event."""
        self.draining = True
        for job in list(self.jobs):
            job.cancel()

    async def prepare(self, fn, *args) -> Any:
        """Run ``fn`` (rendering, tokenizing, compiling) in the preparation threads."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    def check_prompt_size(self, chars: int, what: str) -> None:
        """Refuse, before rendering, text that cannot fit the context whatever the tokenizer does.

        No token of the vocabulary spells more than ``max_token_chars`` characters, so a text longer
        than ``context * max_token_chars`` needs more tokens than the context holds.
        """
        if self._max_token_chars is None:
            vocab = self.engine.tokenizer.get_vocab()
            self._max_token_chars = max((len(t) for t in vocab), default=1) or 1
        limit = self.engine.context_length * self._max_token_chars
        if chars > limit:
            raise APIError(400, f"The {what} has {chars} characters: more than this model's context of "
                           f"{self.engine.context_length} tokens can hold.", param=what,
                           code="context_length_exceeded")

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return
        msg = "Incorrect API key provided." if token else (
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
        )
        raise APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_cards(self) -> list[dict]:
        base = self.engine.name
        card = {"object": "model", "created": self.created, "owned_by": "chinese-vicuna", "root": base}
        return [{"id": base, **card, "parent": None}] + [{"id": a, **card, "parent": base} for a in self.engine.adapters]

    def adapter_for(self, model: str) -> str | None:
        """The adapter a ``model`` name selects (``None``: the bare base); unknown names are a 404."""
        if model in self.engine.adapters:
            return model
        if model in (self.engine.name, "base"):
            return None
        names = ", ".join([self.engine.name, *self.engine.adapters])
        raise APIError(404, f"The model '{model}' does not exist. Available models: {names}.",
                       param="model", code="model_not_found")

    async def read_json(self, request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"Content-Type must be application/json (got {ctype or 'none'}).",
                           code="unsupported_media_type")
        too_large = APIError(413, f"The request body is larger than {self.max_body} bytes.", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads have no length header: count
            body += chunk
            if len(body) > self.max_body:
                raise too_large
        try:
            return json.loads(bytes(body))
        except ValueError as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}.") from None
        except RecursionError:
            raise APIError(400, "We could not parse the JSON body of your request: it is nested too deeply.") from None

    async def admit(self, request: Request) -> asyncio.Future:
        """Wait for a slot (429 if the queue is full; ``ClientGone`` if the client leaves the queue)."""
        if self.draining:
            raise APIError(503, "The server is shutting down.", type="server_error")
        slot = self.admission.enter()
        if not slot.done():
            gone = asyncio.ensure_future(wait_disconnect(request))
            try:
                await asyncio.wait({slot, gone}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                self.admission.leave(slot)
                raise
            finally:
                gone.cancel()
            if not slot.done():
                self.admission.leave(slot)
                raise ClientGone
        return slot

    async def exclusive(self, request: Request, fn, *args) -> Any:
        """Run ``fn`` in a generation thread under admission (embeddings share the model's slots)."""
        slot = await self.admit(request)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.admission.leave(slot)

    async def launch(self, request: Request, job: Job) -> None:
        """Wait for a slot (429 if the queue is full; leave the queue if the client goes), then run."""
        slot = await self.admit(request)
        try:
            future = asyncio.get_running_loop().run_in_executor(self.pool, job.run)
        except BaseException:
            self.admission.leave(slot)
            raise
        self.jobs.add(job)
        future.add_done_callback(lambda f: self._finished(job, slot, f))

    def _finished(self, job: Job, slot: asyncio.Future, future: asyncio.Future) -> None:
        self.jobs.discard(job)
        self.admission.leave(slot)
        self.counters["generated_tokens"] += job.generated
        failed = future.cancelled() or future.exception() is not None
        self.counters["failed" if failed else "cancelled" if job.interrupted else "completed"] += 1
