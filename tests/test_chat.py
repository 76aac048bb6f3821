"""Special tokens and chat templates through import, generation and export, against transformers itself
(a tiny random Llama built here with a ChatML template; nothing is downloaded)."""

import json

import pytest
import torch
from tokenizers import AddedToken
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from anychip.data.chat import PromptTokenizer, SpecialTokens
from anychip.data.tokenizer import load_tokenizer, train_tokenizer
from anychip.errors import UserError
from anychip.interop.hf import export_hf, import_hf
from anychip.model.generate import generate
from anychip.train.run_dir import RunDir, load_run

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog?"}]
TINY = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 96}


def chat_tokenizer():
    """A byte-level BPE with Llama's <s> added by the post-processor and ChatML's control tokens."""
    tok = train_tokenizer([f"the quick brown fox jumps over the lazy dog {i}" for i in range(100)], 300)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<|im_start|>", "<|im_end|>")])
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(HF dir, model, tokenizer): eos = <|im_end|> plus the 4th token greedy decoding of the chat emits, so
    that generation provably stops early on both sides."""
    path = tmp_path_factory.mktemp("hf_chat")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer(), bos_token="<s>", eos_token="<|im_end|>",
                                     chat_template=CHATML)
    prompt = torch.tensor([hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]])
    free = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
    new = free[prompt.shape[1]:].tolist()
    stop = next(t for i, t in enumerate(new) if i >= 3 and t not in new[:i])
    model.generation_config.eos_token_id = [hf_tok.convert_tokens_to_ids("<|im_end|>"), stop]
    model.generation_config.bos_token_id = hf_tok.convert_tokens_to_ids("<s>")
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path, model, hf_tok


def hf_greedy(model, hf_tok, messages):
    prompt = torch.tensor([hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def test_import_keeps_special_tokens_and_template_and_generation_stops_like_transformers(tmp_path, chat_model):
    hf_dir, model, hf_tok = chat_model
    run = import_hf(hf_dir, tmp_path / "run")
    cfg, params, tokenizer = load_run(run)
    prompts = RunDir(run).prompt_tokenizer(tokenizer)
    stop = model.generation_config.eos_token_id[1]
    assert prompts.special == SpecialTokens(bos_token="<s>", eos_tokens=("<|im_end|>", hf_tok.convert_ids_to_tokens(stop)),
                                            pad_token=None, chat_template=CHATML)

    assert prompts.render_chat(MESSAGES) == hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompts.encode_chat(MESSAGES) == hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    for text in ["<|im_start|>user\nhi<|im_end|>", "the lazy dog", ""]:  # control-token text is the token
        assert prompts.encode(text) == hf_tok(text)["input_ids"]
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert prompts.encode("<|im_start|>")[1:] == [im_start]
    assert im_start not in load_tokenizer(run / "tokenizer.json").encode("<|im_start|>").ids  # training data: text

    expected = hf_greedy(model, hf_tok, MESSAGES)  # ends with the eos token, which anychip does not return
    assert expected[-1] in prompts.stop_ids and len(expected) < 12
    ours = generate(params, cfg.model, [prompts.encode_chat(MESSAGES)], max_new_tokens=12, temperature=0,
                    stop_tokens=prompts.stop_ids)[0]
    assert ours == expected[:-1]


def test_export_writes_special_tokens_and_template_back(tmp_path, chat_model):
    hf_dir, model, hf_tok = chat_model
    out = export_hf(import_hf(hf_dir, tmp_path / "run"), tmp_path / "out")
    exported_tok = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    for messages in (MESSAGES, MESSAGES[1:]):
        assert (exported_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        assert hf_greedy(exported, exported_tok, messages) == hf_greedy(model, hf_tok, messages)
    for text in ["<|im_start|>user\nhi<|im_end|>", "plain text"]:
        assert exported_tok(text)["input_ids"] == hf_tok(text)["input_ids"]
    assert (exported_tok.bos_token, exported_tok.eos_token) == ("<s>", "<|im_end|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model.generation_config.eos_token_id


def test_anychip_tokenizers_get_end_of_text_defaults(tmp_path):
    tok = train_tokenizer(["some text to learn from"] * 10, 280)
    special = SpecialTokens.defaults(tok)
    assert special == SpecialTokens("<|endoftext|>", ("<|endoftext|>",), "<|endoftext|>", None)
    prompts = PromptTokenizer(tok, special)
    assert prompts.stop_ids == (0,) and prompts.encode("a<|endoftext|>b")[1] == 0
    assert 0 not in tok.encode("a<|endoftext|>b").ids  # the caller's tokenizer still reads it as text
    with pytest.raises(UserError, match="no chat template"):
        prompts.render_chat(MESSAGES)
    (tmp_path / "special_tokens.json").write_text(json.dumps({"eos_tokens": ["<|im_end|>"]}))
    with pytest.raises(UserError, match="'<|im_end|>' is not a token"):
        RunDir(tmp_path).read_special_tokens(tok)


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "the chat template failed"),  # the sandbox refuses
    ("{{ messages.append(1) }}", "the chat template failed"),  # immutable: no side effects on the input
    ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
    ("{% for m in messages %}", "not valid Jinja"),
])
def test_chat_templates_run_sandboxed(template, message):
    tok = train_tokenizer(["some text to learn from"] * 10, 280)
    prompts = PromptTokenizer(tok, SpecialTokens(chat_template=template))
    with pytest.raises(UserError, match=message):
        prompts.render_chat(MESSAGES)
