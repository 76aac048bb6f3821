"""What a prompt is to a run's tokenizer: its special tokens (bos, end of sequence, pad), its chat template,
and prompt encoding, in which special-token text becomes the token, as in transformers by default.

Training data is encoded by `load_tokenizer`'s tokenizer, which reads "<|im_start|>" inside a document as
plain text, so no document can forge a control token. A prompt is the user talking to the model, so its
control tokens count: `PromptTokenizer.encode("<|im_start|>user")` starts with the token <|im_start|>.

A run keeps these facts in RUN_DIR/special_tokens.json (`RunDir.special_tokens`). Import writes that file
from the Hugging Face tokenizer_config.json and generation_config.json, export writes them back, and an
anychip-trained tokenizer gets `SpecialTokens.defaults`. Chat templates are Jinja, rendered in jinja2's
immutable sandbox as transformers renders them: a template that came with a downloaded model is untrusted
input, and the sandbox keeps it away from Python internals.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from tokenizers import Tokenizer

from anychip.data.tokenizer import EOT
from anychip.errors import UserError, require


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a tokenizer by their text, and its chat template (special_tokens.json)."""

    bos_token: str | None = None
    """Starts a sequence: lm-eval's prefix for an empty context, an empty prompt's first token, the
    template's `bos_token`. Whether plain encoding adds it is the tokenizer.json post-processor's business."""
    eos_tokens: tuple[str, ...] = ()
    """Generation stops at any of these; the first is the tokenizer's `eos_token`."""
    pad_token: str | None = None
    """Padding token for transformers' batched generate."""
    chat_template: str | None = None
    """Jinja template that turns a list of messages into a prompt (transformers' `chat_template`)."""

    @classmethod
    def defaults(cls, tokenizer: Tokenizer) -> SpecialTokens:
        """anychip's tokenizers: EOT separates documents, so it starts, ends and pads them; no chat template."""
        eot = EOT if tokenizer.token_to_id(EOT) is not None else None
        return cls(bos_token=eot, eos_tokens=(eot,) if eot else (), pad_token=eot)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, tokenizer: Tokenizer, where: str) -> SpecialTokens:
        """Parse special_tokens.json; every token it names must be in `tokenizer`."""
        try:
            data = json.loads(text)
            special = cls(bos_token=data.get("bos_token"), eos_tokens=tuple(data.get("eos_tokens") or ()),
                          pad_token=data.get("pad_token"), chat_template=data.get("chat_template"))
        except (ValueError, AttributeError, TypeError) as e:
            raise UserError(f"{where} is not a special-tokens file ({e})") from None
        special.check(tokenizer, where)
        return special

    def check(self, tokenizer: Tokenizer, where: str) -> None:
        for token in (self.bos_token, *self.eos_tokens, self.pad_token):
            require(token is None or (isinstance(token, str) and tokenizer.token_to_id(token) is not None),
                    f"{where}: {token!r} is not a token of the tokenizer")
        require(self.chat_template is None or isinstance(self.chat_template, str),
                f"{where}: chat_template must be text")


class PromptTokenizer:
    """A run's tokenizer as prompts see it: special-token text encodes to the token, generation stops at the
    end-of-sequence tokens, and chat messages go through the chat template."""

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokens):
        self.special = special
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's keeps its own setting
        self.tokenizer.encode_special_tokens = False  # "<|im_end|>" in a prompt is the token
        self.stop_ids = tuple(dict.fromkeys(self.tokenizer.token_to_id(t) for t in special.eos_tokens))
        self.bos_id = None if special.bos_token is None else self.tokenizer.token_to_id(special.bos_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens runs the tokenizer's post-processor (e.g. Llama's BOS),
        as transformers' `tokenizer(text)` does. Chat prompts pass False: the template wrote them."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, by default without special tokens (what OpenAI-style servers return)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (logprob listings)."""
        return self.decode([token_id], skip_special_tokens=False)

    def first_token(self) -> int:
        """Where an empty prompt starts: bos, else the first end-of-sequence token (a document boundary)."""
        start = self.bos_id if self.bos_id is not None else (self.stop_ids or (None,))[0]
        require(start is not None, "an empty prompt needs a bos or eos token; this tokenizer has neither")
        return start

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}]), as transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it."""
        if self.special.chat_template is None:
            raise UserError("this run has no chat template: set chat_template in RUN_DIR/special_tokens.json "
                            "(a Jinja template, as in a Hugging Face tokenizer_config.json)")
        import jinja2

        names = {"bos_token": self.special.bos_token, "pad_token": self.special.pad_token,
                 "eos_token": (self.special.eos_tokens or (None,))[0]}
        try:
            return _compile(self.special.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **{k: v for k, v in names.items() if v is not None})
        except jinja2.TemplateError as e:  # includes the sandbox's SecurityError and raise_exception()
            raise UserError(f"the chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat: the template writes any bos itself (transformers encodes it
        with add_special_tokens=False too)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def stop_index(text: str, stops: Sequence[str]) -> int:
    """Where `text` is cut for the stop strings `stops`: the start of the earliest one, else len(text)."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON (transformers does this too)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """A template compiled in the immutable sandbox with the helpers chat templates use in transformers."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
