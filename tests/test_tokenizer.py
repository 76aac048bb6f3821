import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from anychip.data.tokenizer import (
    EOT,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    token_byte_lengths,
    tokenizer_hash,
    train_tokenizer,
)
from anychip.errors import UserError

_rng = random.Random(0)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n" * 10,
    "Grüße aus Zürich! Ça va? 東京は晴れです。" * 5,
    # Enough distinct words that BPE does not run out of merges before 400 tokens.
    " ".join("".join(_rng.choices("abcdefghijklmnop", k=_rng.randint(2, 7))) for _ in range(3000)),
]
TEXTS = {
    "ascii": "Hello, world! 1234 ~!@#$%^&*()_+",
    "unicode": "日本語のテキスト, 中文, 한국어, Ελληνικά, עברית, emoji 🦀🚀👩‍👩‍👧, e\u0301 (combining)",
    "code": "\tdef f(x):\n\t\treturn {'a': [1,2]}  \n\n\n    # trailing   \r\n\x00\x7f end\n",
    "whitespace": "   \n\n\t \t  \n",
    "literal_eot": f"text that mentions {EOT} inside a document",
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 400)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(tok, name):
    text = TEXTS[name]
    assert tok.decode(tok.encode(text).ids) == text


def test_eot_is_special_id_0_and_not_forged_by_text(tok):
    assert eot_id(tok) == 0
    assert tok.id_to_token(0) == EOT
    # A document that merely contains the EOT string must not produce a document boundary.
    assert 0 not in tok.encode(TEXTS["literal_eot"]).ids


def test_vocab_size_is_respected(tok):
    assert tok.get_vocab_size() == 400
    assert train_tokenizer(CORPUS, 300).get_vocab_size() == 300


def test_vocab_size_below_bytes_plus_eot_is_a_user_error():
    with pytest.raises(UserError, match="at least 257"):
        train_tokenizer(CORPUS, 256)


def test_hash_stable_across_save_load_and_distinct(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    assert len(tokenizer_hash(tok)) == 64
    # Key order in the file must not matter, only content.
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(dict(reversed(json.loads(path.read_text()).items()))))
    assert tokenizer_hash(load_tokenizer(reordered)) == tokenizer_hash(tok)
    assert tokenizer_hash(train_tokenizer(CORPUS, 300)) != tokenizer_hash(tok)
    assert tokenizer_hash(train_tokenizer(CORPUS[:2], 400)) != tokenizer_hash(tok)


def test_loaded_tokenizer_keeps_eot_literal_as_text(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "t.json")
    loaded = load_tokenizer(tmp_path / "t.json")
    text = TEXTS["literal_eot"]
    assert 0 not in loaded.encode(text).ids
    assert loaded.decode(loaded.encode(text).ids) == text


def test_save_never_overwrites(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        save_tokenizer(tok, path)
    assert path.read_text() == "precious"


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="is not a tokenizer.json"):
        load_tokenizer(bad)


def test_token_byte_lengths_count_utf8_bytes(tok):
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (400,) and lengths.dtype == np.int32
    assert lengths[0] == 0  # EOT stands for no text
    for name, text in TEXTS.items():
        ids = tok.encode(text).ids
        assert lengths[ids].sum() == len(text.encode("utf-8")), name
    # "東" is 3 UTF-8 bytes: E6 9D B1. Its byte-level token (if merged) or the three byte tokens total 3.
    assert lengths[tok.encode("東").ids].sum() == 3


def test_eot_missing_and_non_byte_level_are_user_errors():
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "中文": 1}, unk_token="[UNK]"))
    with pytest.raises(UserError, match="no <|endoftext|> token"):
        eot_id(word_level)
    with pytest.raises(UserError, match="not a byte-level BPE tokenizer"):
        token_byte_lengths(word_level)
