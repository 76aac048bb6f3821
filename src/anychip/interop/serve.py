"""`anychip serve RUN_DIR`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over the batching engine.

    GET  /health                 {"status": "ok", slots, running, waiting, steps}
    GET  /v1/models              the one model served (its name: --model-name, else the run dir's name)
    POST /v1/completions         text or token-id prompts; stream=true sends server-sent events
    POST /v1/chat/completions    messages through the run's chat template
    GET  /tokenizer_info, POST /tokenize, POST /detokenize    the run's tokenizer, as vLLM serves it (lm-eval's
                                 `local-completions` then needs no tokenizer of its own)

The HTTP layer only parses, submits and formats (openai_api.py); the engine (engine.py) does the work on
its own thread. A client that disconnects cancels its requests, which frees their slots at the next step.
SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish, then exits.
Binds to 127.0.0.1 unless --host says otherwise: there is no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from anychip.data.chat import PromptTokenizer
from anychip.errors import UserError, require
from anychip.interop import openai_api as api
from anychip.interop.engine import Engine, Event, Finished, Prompt, QueueFull, Token
from anychip.interop.openai_api import APIError, ChoiceText, Job

SHUTDOWN_GRACE_S = 60  # in-flight requests get this long after SIGTERM before connections are closed anyway


class Submission:
    """A job's requests in the engine; their events arrive on the event loop, in order per request."""

    def __init__(self, engine: Engine, job: Job):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.handles = []
        try:
            for i, request in enumerate(job.requests):
                def emit(event: Event, i: int = i) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

                self.handles.append(engine.submit(request, emit))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        remaining = len(self.handles)
        while remaining:
            i, event = await self.queue.get()
            remaining -= isinstance(event, Finished)
            yield i, event

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


class Choices:
    """The state of a job's choices as events arrive: text, prompt scores, finish reasons."""

    def __init__(self, job: Job, tokenizer: PromptTokenizer):
        self.job, self.tokenizer = job, tokenizer
        self.texts = [ChoiceText(tokenizer, job.stop) for _ in job.requests]
        self.prompts: list[Prompt | None] = [None] * len(job.requests)
        self.finish: list[str | None] = [None] * len(job.requests)
        self.reported = [0] * len(job.requests)  # tokens whose logprobs were streamed

    def apply(self, i: int, event: Event, submission: Submission) -> None:
        if isinstance(event, Prompt):
            self.prompts[i] = event
        elif isinstance(event, Token) and self.finish[i] is None:
            self.texts[i].add(event)
            if self.texts[i].stopped:  # a stop string: done, and its slot is freed
                self.finish[i] = "stop"
                submission.handles[i].cancel()
        elif isinstance(event, Finished) and self.finish[i] is None:
            if event.reason == "error":
                raise APIError(500, event.error or "internal error", type="server_error")
            self.finish[i] = event.reason

    def echo_text(self, i: int) -> str:
        return self.tokenizer.decode(list(self.job.requests[i].prompt), skip_special_tokens=False)

    def logprobs(self, i: int, tokens: list[Token], with_prompt: bool) -> dict | None:
        if self.job.logprobs is None:
            return None
        if self.job.kind == "chat":
            return api.chat_logprobs(self.tokenizer, tokens)
        triples = [(t.token, t.logprob, t.top) for t in tokens]
        offset = len(self.echo_text(i)) if self.job.echo else 0
        if with_prompt and self.prompts[i] is not None:
            prompt, scores = self.job.requests[i].prompt, self.prompts[i]
            triples = [(prompt[0], None, [])] + list(zip(prompt[1:], scores.logprobs, scores.top)) + triples
            offset = 0
        return api.completion_logprobs(self.tokenizer, triples, offset)

    def usage(self) -> dict[str, int]:
        return api.usage(sum(len(r.prompt) for r in self.job.requests), sum(len(t.tokens) for t in self.texts))

    def response(self, model: str) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(self.texts):
            if self.job.kind == "chat":
                choice = {"message": {"role": "assistant", "content": text.text}}
            else:
                choice = {"text": (self.echo_text(i) if self.job.echo else "") + text.text}
            choices.append({"index": i, **choice, "logprobs": self.logprobs(i, text.tokens, with_prompt=True),
                            "finish_reason": self.finish[i]})
        return {**api.envelope(self.job, model, choices), "usage": self.usage()}

    def chunk(self, i: int, model: str, first: bool) -> dict[str, Any] | None:
        """The streamed chunk of choice i for what changed since the last one (None: nothing to send)."""
        final = self.finish[i] is not None
        delta = self.texts[i].delta(final)
        new_tokens = self.texts[i].tokens[self.reported[i]:] if self.job.logprobs is not None else []
        self.reported[i] = len(self.texts[i].tokens)
        if self.job.echo and first:
            delta = self.echo_text(i) + delta
        if not (delta or new_tokens or final or first):
            return None
        if self.job.kind == "chat":
            body = {"delta": {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})}
        else:
            body = {"text": delta}
        choice = {"index": i, **body, "logprobs": self.logprobs(i, new_tokens, with_prompt=first),
                  "finish_reason": self.finish[i]}
        return api.envelope(self.job, model, [choice], chunk=True)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _complete(engine: Engine, tokenizer: PromptTokenizer, job: Job, model: str) -> dict[str, Any]:
    submission = Submission(engine, job)
    choices = Choices(job, tokenizer)
    try:
        async for i, event in submission.events():
            choices.apply(i, event, submission)
    finally:
        submission.cancel()  # a client gone away (this task cancelled) frees its slots
    return choices.response(model)


async def _stream(submission: Submission, choices: Choices, model: str) -> AsyncIterator[str]:
    """Server-sent events: a chunk per change of a choice (a chat choice opens with its role), then the usage
    when asked for, then [DONE]. Cancelled with the connection, which frees the slots."""
    job, started = choices.job, set()
    try:
        if job.kind == "chat":
            for i in range(len(job.requests)):
                yield _sse(choices.chunk(i, model, first=True))
                started.add(i)
        async for i, event in submission.events():
            try:
                choices.apply(i, event, submission)
            except APIError as e:
                yield _sse(e.body())
                break
            if (chunk := choices.chunk(i, model, first=i not in started)) is not None:
                started.add(i)
                yield _sse(chunk)
        if job.include_usage:
            yield _sse({**api.envelope(job, model, [], chunk=True), "usage": choices.usage()})
        yield _sse("[DONE]")
    finally:
        submission.cancel()


# ---------------------------------------------------------------------------------------------
# The app


def build_app(engine: Engine, tokenizer: PromptTokenizer, model: str) -> Any:
    """The Starlette app: thin handlers over `engine` (started and stopped with the app's lifespan)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def generation(request: Request, parse: Any) -> Any:
        try:
            body = await body_of(request)
            api.check_model(body, model)
            job = parse(body, tokenizer, engine)
            if job.stream:
                submission = Submission(engine, job)  # a full queue answers 429 before the stream starts
                return StreamingResponse(_stream(submission, Choices(job, tokenizer), model),
                                         media_type="text/event-stream")
            return JSONResponse(await _until_disconnect(request, _complete(engine, tokenizer, job, model)))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)

    async def completions(request: Request) -> Any:
        return await generation(request, api.parse_completion)

    async def chat_completions(request: Request) -> Any:
        return await generation(request, api.parse_chat)

    async def models(_: Request) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                                         "owned_by": "anychip", "max_model_len": engine.max_seq_len}]})

    async def health(_: Request) -> Any:
        return JSONResponse({"status": "ok", **engine.stats()})

    async def tokenizer_info(_: Request) -> Any:
        s = tokenizer.special
        return JSONResponse({"bos_token": s.bos_token, "eos_token": (s.eos_tokens or (None,))[0],
                             "pad_token": s.pad_token, "chat_template": s.chat_template,
                             "model_max_length": engine.max_seq_len})

    async def tokenize(request: Request) -> Any:
        try:
            body = await body_of(request)
            if "messages" in body:
                tokens = tokenizer.encode_chat(body["messages"], bool(body.get("add_generation_prompt", True)))
            else:
                tokens = tokenizer.encode(str(body.get("prompt", "")), bool(body.get("add_special_tokens", True)))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_seq_len})

    async def detokenize(request: Request) -> Any:
        try:
            tokens = (await body_of(request)).get("tokens")
            if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
                raise APIError(400, "'tokens' must be a list of token ids", "tokens")
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse({"prompt": tokenizer.decode(tokens, skip_special_tokens=False)})

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.stop)  # after uvicorn let the requests in flight finish
        print("anychip serve: stopped", flush=True)

    return Starlette(lifespan=lifespan, routes=[
        Route("/health", health), Route("/v1/models", models), Route("/tokenizer_info", tokenizer_info),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
    ])


async def _until_disconnect(request: Any, work: Any) -> Any:
    """Run `work` unless the client disconnects first, in which case it is cancelled (its slots freed)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "the client disconnected")
    return task.result()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any compute: a port in use fails at once, and port 0 works."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, slots: int = 8,
          max_queue: int = 64, max_seq_len: int | None = None, dtype: str = "float32",
          model_name: str | None = None, log: Any = None) -> None:
    """Load the run's newest checkpoint, compile, and serve until SIGTERM/SIGINT."""
    import uvicorn

    from anychip.train.run_dir import RunDir, load_run
    from anychip.train.step import DTYPES

    require(slots > 0 and max_queue >= 0, f"need --slots > 0 and --max-queue >= 0, got {slots} and {max_queue}")
    require(0 <= port < 65536, f"--port must be in [0, 65535], got {port}")
    log = log or (lambda message: print(message, flush=True))
    sock = _listen(host, port)
    cfg, params, tokenizer = load_run(run_dir)
    prompts = RunDir(run_dir).prompt_tokenizer(tokenizer)
    engine = Engine(params, cfg.model, slots=slots, max_seq_len=max_seq_len, max_queue=max_queue,
                    compute_dtype=DTYPES[dtype], log=log)
    model = model_name or Path(run_dir).resolve().name
    log(f"anychip serve: compiling ({slots} slots x {engine.max_seq_len} tokens, KV cache "
        f"{engine.cache_bytes / 2**20:,.1f} MiB, {dtype})")
    warm = engine.warm_up()
    engine.start()
    config = uvicorn.Config(build_app(engine, prompts, model), log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    netloc = f"[{host}]" if ":" in host else host
    log(f"anychip serve: model '{model}' ready on http://{netloc}:{sock.getsockname()[1]}/v1 "
        f"(compiled in {warm:.1f}s)")
    uvicorn.Server(config).run(sockets=[sock])  # re-raises a SIGTERM it caught once it has drained
