"""The OpenAI API as the server speaks it: request bodies → engine requests, engine events → response bodies.

Completions take a prompt as text, a list of texts, token ids or a list of those, with max_tokens,
temperature, top_p, top_k (an extension, as in vLLM), stop, seed, logprobs, echo, stream (with
stream_options.include_usage) and ignore_eos (vLLM's extension: run to max_tokens). `echo` with
`logprobs` and max_tokens 0 or 1 is how lm-eval scores log-likelihoods. Chat completions render the
messages with the run's chat template. Errors are OpenAI's JSON: {"error": {"message", "type", "param",
"code"}}. Nothing here touches HTTP or threads; `serve.py` does.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from anychip.data.chat import PromptTokenizer, stop_index
from anychip.errors import UserError
from anychip.interop.engine import MAX_TOP_LOGPROBS, Engine, Request, RequestError, Token

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An OpenAI-style error response: HTTP status and the JSON body's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """One API call: a request per prompt, and what the response needs to say about them."""

    kind: str  # "completion" or "chat"
    requests: tuple[Request, ...]
    stop: tuple[str, ...]
    logprobs: int | None  # alternatives per token in the response; None: no logprobs
    echo: bool
    stream: bool
    include_usage: bool
    id: str
    created: int


# ---------------------------------------------------------------------------------------------
# Request bodies


def _field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be {getattr(kinds, '__name__', kinds)}, not a boolean", name)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' has the wrong type ({type(value).__name__})", name)
    return value


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise APIError(400, message, param)


def check_model(body: dict[str, Any], served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served}'", "model",
                       code="model_not_found")


def _prompts(prompt: Any, tokenizer: PromptTokenizer) -> list[tuple[int, ...]]:
    """A prompt as text, a list of texts, token ids, or a list of token-id lists → token ids per prompt."""
    if isinstance(prompt, str):
        return [tuple(tokenizer.encode(prompt) or [tokenizer.first_token()])]
    _check(isinstance(prompt, list) and len(prompt) > 0, "'prompt' must be text, token ids or a non-empty list", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [tuple(prompt)]
    out = []
    for p in prompt:
        _check(isinstance(p, (str, list)), "each prompt must be text or a list of token ids", "prompt")
        out += _prompts(p, tokenizer)
    return out


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    _check(isinstance(stop, list) and all(isinstance(s, str) for s in stop), "'stop' must be text or a list of texts",
           "stop")
    return tuple(s for s in stop if s)


def _sampling(body: dict[str, Any], tokenizer: PromptTokenizer) -> Request:
    """The settings every prompt of a call shares (its prompt and max_tokens are filled in after)."""
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    top_k = _field(body, "top_k", int, 0)
    seed = _field(body, "seed", int, None)
    _check(0 <= temperature <= 2, "'temperature' must be in [0, 2]", "temperature")
    _check(0 < top_p <= 1, "'top_p' must be in (0, 1]", "top_p")
    _check(top_k >= -1, "'top_k' must be >= 0 (0 or -1: off)", "top_k")
    _check(_field(body, "n", int, 1) == 1, "only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        _check(_field(body, name, (int, float), 0) == 0, f"'{name}' is not supported", name)
    _check(not body.get("logit_bias"), "'logit_bias' is not supported", "logit_bias")
    if seed is None:
        seed = uuid.uuid4().int % 2**32
    stop_ids = frozenset() if _field(body, "ignore_eos", bool, False) else frozenset(tokenizer.stop_ids)
    return Request((), 0, temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed % 2**32,
                   stop_ids=stop_ids)


def _max_tokens(body: dict[str, Any], names: tuple[str, ...], default: int | None, prompt_len: int,
                engine: Engine) -> int:
    value = next((body[n] for n in names if body.get(n) is not None), None)
    if value is None:
        return max(default if default is not None else engine.max_seq_len - prompt_len, 0)
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
           f"'{names[0]}' must be an integer >= 0", names[0])
    return value


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    return stream, bool(options.get("include_usage")) and stream


def _job(kind: str, requests: list[Request], body: dict[str, Any], logprobs: int | None, echo: bool,
         engine: Engine) -> Job:
    for r in requests:
        try:
            engine.check(r)
        except RequestError as e:
            raise APIError(400, str(e), "prompt" if not r.prompt else "max_tokens") from None
    stream, usage = _stream_options(body)
    return Job(kind, tuple(requests), _stop(body), logprobs, echo, stream, usage,
               f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}", int(time.time()))


def parse_completion(body: dict[str, Any], tokenizer: PromptTokenizer, engine: Engine) -> Job:
    _check("prompt" in body, "'prompt' is required", "prompt")
    _check(not body.get("suffix") and _field(body, "best_of", int, 1) == 1, "'suffix' and 'best_of' are not "
           "supported", "suffix")
    logprobs = _field(body, "logprobs", int, None)
    _check(logprobs is None or 0 <= logprobs <= MAX_TOP_LOGPROBS, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}]",
           "logprobs")
    echo = _field(body, "echo", bool, False)
    base = _sampling(body, tokenizer)
    requests = []
    for prompt in _prompts(body["prompt"], tokenizer):
        n = _max_tokens(body, ("max_tokens",), COMPLETION_DEFAULT_MAX_TOKENS, len(prompt), engine)
        requests.append(replace(base, prompt=prompt, max_tokens=n, top_logprobs=logprobs or 0,
                                prompt_logprobs=echo and logprobs is not None))
    return _job("completion", requests, body, logprobs, echo, engine)


def _message_text(content: Any) -> str:
    """A message's content: text, or OpenAI's list of parts of which the text ones are joined."""
    if isinstance(content, str):
        return content
    _check(isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content),
           "message content must be text or a list of text parts", "messages")
    return "\n".join(str(p.get("text", "")) for p in content)


def parse_chat(body: dict[str, Any], tokenizer: PromptTokenizer, engine: Engine) -> Job:
    messages = body.get("messages")
    _check(isinstance(messages, list) and len(messages) > 0 and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                                   for m in messages),
           "'messages' must be a non-empty list of {role, content}", "messages")
    messages = [{**m, "content": _message_text(m.get("content", ""))} for m in messages]
    try:
        prompt = tuple(tokenizer.encode_chat(messages))
    except UserError as e:
        raise APIError(400, str(e), "messages") from None
    logprobs = _field(body, "top_logprobs", int, 0) if _field(body, "logprobs", bool, False) else None
    _check(logprobs is None or 0 <= logprobs <= MAX_TOP_LOGPROBS, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]",
           "top_logprobs")
    n = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None, len(prompt), engine)
    request = replace(_sampling(body, tokenizer), prompt=prompt, max_tokens=n, top_logprobs=logprobs or 0)
    return _job("chat", [request], body, logprobs, False, engine)


# ---------------------------------------------------------------------------------------------
# One choice's text


class ChoiceText:
    """A choice's text as its tokens arrive: detokenized as a whole (a character's bytes may span tokens),
    cut before the first stop string, and, when streamed, let out only once no stop string can still
    start inside it and no character is half-decoded."""

    def __init__(self, tokenizer: PromptTokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[Token] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: Token) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode([t.token for t in self.tokens])
        cut = stop_index(text, self.stop)
        if cut < len(text):
            self.stopped = True
            while len(self.tokens) > 1 and len(self.tokenizer.decode([t.token for t in self.tokens[:-1]])) >= cut:
                self.tokens.pop()  # tokens after the stop string are not part of the choice
            text = text[:cut]
        self.text = text

    def _releasable(self) -> int:
        end = len(self.text.rstrip("\ufffd"))
        for k in range(min(max(map(len, self.stop), default=1) - 1, end), 0, -1):
            if any(s.startswith(self.text[end - k:end]) for s in self.stop):
                return end - k
        return end

    def delta(self, final: bool) -> str:
        """The text not sent yet that may be sent now (all of it once the choice is final)."""
        end = len(self.text) if final or self.stopped else self._releasable()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


# ---------------------------------------------------------------------------------------------
# Response bodies


def completion_logprobs(tokenizer: PromptTokenizer, tokens: list[tuple[int, float | None, list]], offset: int) -> dict:
    """The legacy completions `logprobs` object for (token, logprob, top alternatives) triples."""
    texts = [tokenizer.token_text(t) for t, _, _ in tokens]
    offsets = [offset + sum(map(len, texts[:i])) for i in range(len(texts))]
    tops = [None if lp is None else {tokenizer.token_text(i): v for i, v in top} for _, lp, top in tokens]
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tokenizer: PromptTokenizer, tokens: list[Token]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                        for t in tokens]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(job: Job, model: str, choices: list[dict], chunk: bool = False) -> dict[str, Any]:
    kind = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
    return {"id": job.id, "object": kind[job.kind], "created": job.created, "model": model, "choices": choices}
