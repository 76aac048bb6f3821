"""Byte-level BPE tokenizer (HF `tokenizers`): train, save, load, fingerprint.

Byte-level means every UTF-8 byte is a base token, so any text encodes with no unknown token and
decodes back exactly. The only special token is `EOT`, appended after every document. Literal
"<|endoftext|>" inside a document is encoded as ordinary text (`encode_special_tokens`), so no
document can forge a document boundary, and round trip holds for any text.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from anychip.errors import UserError

EOT = "<|endoftext|>"
_MIN_VOCAB = 257  # 256 byte tokens + EOT
# Runs of one character class (letters, digits, other symbols, whitespace: the classes of the byte-level
# split) longer than this are cut into pieces of this length before BPE. The trainer's work on a word
# grows with its length times the merges: one 2 MB line without a separator trained for over 8 minutes
# (tried, then killed). No useful token is this long, and text without such runs splits as before.
MAX_RUN = 256
_LONG_RUN = rf"\p{{L}}{{{MAX_RUN}}}|\p{{N}}{{{MAX_RUN}}}|[^\s\p{{L}}\p{{N}}]{{{MAX_RUN}}}|\s{{{MAX_RUN}}}"


def _as_text_only(tok: Tokenizer) -> Tokenizer:
    # Not saved in tokenizer.json, so it is set on every tokenizer we hand out.
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (fewer if the text runs out of merges); EOT is id 0."""
    if vocab_size < _MIN_VOCAB:
        raise UserError(f"vocab_size must be at least {_MIN_VOCAB} (256 bytes + {EOT}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LONG_RUN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=sys.stderr.isatty(),  # the merge phase's own progress bar, for a person watching
    )
    tok.train_from_iterator(texts, trainer)
    return _as_text_only(tok)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as tokenizer.json; an existing file is never replaced."""
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(tok.to_str(pretty=True))
    except FileExistsError:
        raise UserError(f"{path} already exists; not overwriting it") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception for any parse error)
        reason = (str(e) or type(e).__name__).splitlines()[0]
        raise UserError(f"{path} is not a tokenizer.json ({reason})") from None
    return _as_text_only(tok)


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON with sorted keys: equal for equal tokenizers, whatever the file layout."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def eot_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(EOT)
    if token_id is None:
        raise UserError(f"the tokenizer has no {EOT} token; train one with `anychip data prepare`")
    return token_id


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """(vocab_size,) int32: how many UTF-8 bytes each token id stands for; special tokens count 0.

    ByteLevel writes each byte as one printable character, so a token's byte count is the length of
    its string. A character outside that alphabet means the tokenizer is not byte-level.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int32)
    for token, token_id in tok.get_vocab().items():
        if token in special:
            continue
        if not alphabet.issuperset(token):
            raise UserError(f"not a byte-level BPE tokenizer: token {token_id} is {token!r}")
        lengths[token_id] = len(token)
    return lengths
