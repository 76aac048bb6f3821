"""Hugging Face bridges: export a run as a transformers checkpoint, import one as an anychip run.

anychip's decoder is Llama's (RMSNorm, rotate-half RoPE, GQA, SwiGLU), so weights map one to one:
HF `nn.Linear` weights are (out, in) where anychip stores (in..., out...), e.g. q_proj.weight =
wq.reshape(D, H*hd).T. QK-norm (RMSNorm over head_dim, per head, before RoPE) is exactly Qwen3's
q_norm/k_norm, so a qk-norm model exports as Qwen3ForCausalLM. Only safetensors are read: pickle-based
weights (.bin, .pt) can run code on load, and so can configs that ask for `auto_map` remote code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from anychip import storage
from anychip.config import CheckpointConfig, Config, ModelConfig, OptimConfig, TrainConfig
from anychip.data.chat import PromptTokenizer, SpecialTokens
from anychip.data.prepare import find_files, read_documents
from anychip.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer
from anychip.errors import UserError
from anychip.files import atomic_directory, read_text
from anychip.model.params import Params, named_leaves, nest, param_table
from anychip.train.checkpoint import checkpoint_meta, tokenizer_json
from anychip.train.remote_run import fetched_run, publish_run
from anychip.train.run_dir import RunDir, load_run
from anychip.train.step import DTYPES, TrainState, build_trainer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# The optimizer an imported run continues pretraining with (`anychip train RUN/config.yaml init_from=RUN`).
# anychip's from-scratch default (peak 3e-3, 30 warmup steps) re-warms a trained model to a learning rate
# like that of its first steps and overwrites what it knew; continued pretraining that keeps the old
# distribution re-warms to a fraction of the original peak (Gupta et al. 2023, arXiv 2308.04014; Ibrahim
# et al. 2024, arXiv 2403.08763). Llama-class models up to a few billion parameters peak at 3e-4..3e-3, so
# 1e-4 sits at or below a tenth of that; 10 warmup steps let the fresh AdamW moments settle first. The rest
# (cosine to 10%, weight decay 0.1, clipping at 1) is the usual pretraining recipe.
CONTINUED_PRETRAINING = OptimConfig(lr=1e-4, warmup_steps=10)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What import reads of a model directory besides its *.safetensors (a URL's are downloaded, nothing else).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "model.safetensors.index.json")

def to_hf_layout(x: np.ndarray, n_in: int) -> np.ndarray:
    """anychip (in..., out...) → HF Linear (out, in); norms (n_in=0) and the embedding table unchanged."""
    if n_in == 0:
        return x
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)  # (out, in)


def from_hf_layout(y: np.ndarray, shape: tuple[int, ...], n_in: int) -> np.ndarray:
    return y if n_in == 0 else y.T.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Export


def hf_config(cfg: ModelConfig, token_ids: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of the transformers model equal to `cfg`: Llama, or Qwen3 when it has QK-norm.
    token_ids: bos_token_id, eos_token_id, pad_token_id (`generation_token_ids`)."""
    arch = "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": "qwen3" if cfg.qk_norm else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # rope_theta for transformers 4.x, rope_parameters for 5.x: both describe plain (unscaled) RoPE.
        "rope_theta": cfg.rope_base, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "torch_dtype": "float32", **(token_ids or {}),
    }
    if cfg.qk_norm:
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    return out


def hf_state_dict(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """anychip params → HF tensor names and layouts, fp32 (tied models have no lm_head.weight)."""
    leaves = named_leaves(params)
    out = {}
    for name, spec in param_table(cfg).items():
        x = np.asarray(jax.device_get(leaves[name]), dtype=np.float32)
        if spec.stacked:
            out |= {spec.hf_name.format(i=i): to_hf_layout(x[i], spec.hf_in_axes) for i in range(cfg.n_layers)}
        else:
            out[spec.hf_name] = to_hf_layout(x, spec.hf_in_axes)
    return out


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards of at most `max_shard_bytes` plus model.safetensors.index.json."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                 "weight_map": {t: f for f, shard in zip(names, shards) for t in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name, shard in zip(names, shards):
        save_file(shard, out_dir / name, metadata={"format": "pt"})  # transformers expects format=pt
    return names


def generation_token_ids(tokenizer: PromptTokenizer) -> dict[str, Any]:
    """bos/eos/pad ids as generation_config.json and config.json state them (eos: one id or a list)."""
    special, stop = tokenizer.special, list(tokenizer.stop_ids)
    pad = None if special.pad_token is None else tokenizer.tokenizer.token_to_id(special.pad_token)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop[0] if len(stop) == 1 else (stop or None),
            "pad_token_id": pad}


def write_hf_tokenizer(tokenizer: PromptTokenizer, out_dir: Path, max_len: int) -> None:
    """tokenizer.json and a tokenizer_config.json (special tokens, chat template) that make AutoTokenizer a
    PreTrainedTokenizerFast encoding prompts as anychip does. No add_bos_token: whether a bos is added is
    the tokenizer.json post-processor's, on both sides."""
    save_tokenizer(tokenizer.tokenizer, out_dir / "tokenizer.json")
    special = tokenizer.special
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special.bos_token,
        "eos_token": (special.eos_tokens or (None,))[0], "pad_token": special.pad_token,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,  # decode must give back exactly the bytes
    }
    if special.chat_template is not None:
        config["chat_template"] = special.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def export_hf(run_dir: str | Path, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str | Path:
    """Write the newest checkpoint of `run_dir` as a transformers model directory `out_dir` (new or empty):
    weights, config.json, tokenizer and generation_config.json with the run's special tokens and template.
    Either may be a URL (s3://, gs://). It is built in a hidden sibling and renamed: complete, or (full
    disk, SIGTERM) not there at all; in object storage it is built locally and uploaded with config.json
    last, the file transformers opens first (a failed upload removes the rest)."""
    storage.check_new_folder(out_dir)
    with fetched_run(run_dir) as local_run:
        cfg, params, tokenizer = load_run(local_run)
        prompts = RunDir(local_run).prompt_tokenizer(tokenizer)
    tensors = hf_state_dict(params, cfg.model)
    ids = generation_token_ids(prompts)
    remote = storage.is_remote(out_dir)
    build = (tempfile.TemporaryDirectory(prefix="anychip-export-") if remote
             else atomic_directory(storage.local_path(out_dir)))
    with build as tmp:
        tmp = Path(tmp)
        try:
            (tmp / "config.json").write_text(json.dumps(hf_config(cfg.model, ids), indent=2))
            (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2))
            write_safetensors(tensors, tmp, max_shard_bytes)
            write_hf_tokenizer(prompts, tmp, cfg.model.max_seq_len)
        except (OSError, safetensors.SafetensorError) as e:
            raise UserError(f"{out_dir}: cannot write ({str(e).splitlines()[0]}); nothing was left there") from None
        if remote:
            storage.upload_folder(tmp, str(out_dir), last="config.json")
    return out_dir if remote else storage.local_path(out_dir)


# ---------------------------------------------------------------------------------------------
# Import


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; missing, non-UTF-8, not JSON or not an object: one line."""
    try:
        data = json.loads(read_text(path, path.name))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "text", list: "a list"}
_REQUIRED = object()


def _is_kind(value: Any, kind: type) -> bool:
    if kind in (int, float) and isinstance(value, bool):  # JSON true is no number
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _get(hf: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """config.json's `key`, checked to be a `kind` (null counts as missing); a string "32" is not a number."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"config.json lacks {key}")
        return default
    if not _is_kind(value, kind):
        raise UserError(f"config.json: {key} must be {_KINDS[kind]}, got {value!r}")
    return value


def _rope_theta(hf: dict[str, Any]) -> float:
    """The base of plain RoPE, read as transformers 5 reads it: `rope_scaling` (4.x) when set, else
    `rope_parameters`, their rope_theta before the top-level one. Every other form (linear, dynamic, yarn,
    longrope, llama3, proportional scaling, partial rotary, per-layer-type parameters) is refused by name,
    never dropped: it changes the rotation of every position."""
    key = "rope_scaling" if hf.get("rope_scaling") is not None else "rope_parameters"
    rope = hf.get(key) if hf.get(key) is not None else {}
    if not isinstance(rope, dict):
        raise UserError(f"config.json: {key} must be a mapping, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"config.json: {key} asks for {kind!r} RoPE scaling, which anychip does not implement "
                        "(it imports plain RoPE only)")
    if any(isinstance(v, dict) for v in rope.values()):
        raise UserError(f"config.json: {key} gives RoPE parameters per layer type, which anychip does not implement")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"config.json: partial_rotary_factor={partial!r} (RoPE on part of each head) is not "
                        "implemented by anychip")
    theta = _get(rope, "rope_theta", float, None)
    return _get(hf, "rope_theta", float, 10000.0) if theta is None else theta


def _has_sliding_window(hf: dict[str, Any]) -> bool:
    if hf.get("model_type") == "qwen3":
        return _get(hf, "use_sliding_window", bool, False)
    window = _get(hf, "sliding_window", int, None)
    return window is not None and window < _get(hf, "max_position_embeddings", int)  # the whole context: none


def _check_supported(hf: dict[str, Any]) -> str:
    """The architecture name, or a one-line UserError naming the first unsupported feature."""
    if "auto_map" in hf:
        raise UserError("config.json asks for remote code (auto_map); anychip runs no downloaded code")
    archs = _get(hf, "architectures", list, ["(none)"])
    arch = archs[0] if archs else "(none)"
    if arch not in SUPPORTED_ARCHITECTURES or len(archs) != 1:
        raise UserError(f"architecture {arch} is not supported; anychip imports {', '.join(SUPPORTED_ARCHITECTURES)}")
    hidden, heads = _get(hf, "hidden_size", int), _get(hf, "num_attention_heads", int)
    unsupported = {
        "attention_bias": _get(hf, "attention_bias", bool, False),
        "mlp_bias": _get(hf, "mlp_bias", bool, False),
        f"hidden_act={hf.get('hidden_act')}": _get(hf, "hidden_act", str, "silu") != "silu",
        "a sliding attention window": _has_sliding_window(hf),
        "head_dim != hidden_size / num_attention_heads":
            heads > 0 and _get(hf, "head_dim", int, hidden // heads) * heads != hidden,
    }
    for feature, present in unsupported.items():
        if present:
            raise UserError(f"{arch} with {feature} is not supported by anychip")
    return arch


def model_config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """The anychip model shape of a transformers config.json (a dict), if anychip runs it exactly."""
    arch = _check_supported(hf)
    heads, rope_base = _get(hf, "num_attention_heads", int), _rope_theta(hf)
    try:
        return ModelConfig(
            name=name, vocab_size=_get(hf, "vocab_size", int), d_model=_get(hf, "hidden_size", int),
            n_layers=_get(hf, "num_hidden_layers", int), n_heads=heads,
            n_kv_heads=_get(hf, "num_key_value_heads", int, heads), d_ff=_get(hf, "intermediate_size", int),
            max_seq_len=_get(hf, "max_position_embeddings", int), rope_base=rope_base,
            norm_eps=_get(hf, "rms_norm_eps", float, 1e-6), qk_norm=arch == "Qwen3ForCausalLM",
            tie_embeddings=_get(hf, "tie_word_embeddings", bool, False),
            init_std=_get(hf, "initializer_range", float, 0.02),
        )
    except UserError as e:  # the shape itself is impossible (zero heads, heads that do not divide, ...)
        raise UserError(f"config.json does not describe a valid model: {e}") from None


def _inside(hf_dir: Path, name: Any, where: str) -> Path:
    """hf_dir/name, for a relative name that stays inside hf_dir (symlinks there, as in the HF cache, are
    followed: they are the directory's own files)."""
    if (not isinstance(name, str) or not name.strip() or "\x00" in name or Path(name).is_absolute()
            or ".." in Path(name).parts):
        raise UserError(f"{where} names {name!r}: only files inside {hf_dir} are read")
    return hf_dir / name


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a model directory; pickle-based weights are refused, never opened."""
    index_path = hf_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no weight_map (tensor name -> file)")
        names = list(weight_map.values())
        files = [_inside(hf_dir, f, str(index_path)) for f in names]  # refuses a non-text name too
        files = sorted(set(files))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index_path} names {missing[0]}, which is not in {hf_dir}")
        return files
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files and any(any(hf_dir.glob(f"*{suffix}")) for suffix in PICKLE_SUFFIXES):
        raise UserError(f"{hf_dir}: refusing to load pickle-based weights; convert to safetensors")
    if not files:
        raise UserError(f"{hf_dir} has no *.safetensors weights")
    return files


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    """Every tensor as fp32 numpy (through JAX, which, unlike numpy, reads bf16). A damaged header (a length
    field past the end, bad JSON, offsets outside the file) or a tensor stored twice is one line."""
    out = {}
    for path in files:
        try:
            with safetensors.safe_open(path, framework="flax") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    if name in out:
                        raise UserError(f"{path}: tensor {name} is also in another weight file")
                    out[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
        except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> Params:
    """HF tensors → anychip params (numpy fp32); every tensor must be used and have the expected shape."""
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...], n_in: int) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"the weights lack {name}")
        hf_shape = shape if n_in == 0 else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
        if tensors[name].shape != hf_shape:
            raise UserError(f"{name} has shape {tensors[name].shape}, config.json implies {hf_shape}")
        used.add(name)
        return from_hf_layout(tensors[name], shape, n_in)

    flat = {}
    for name, spec in param_table(cfg).items():
        if spec.stacked:
            flat[name] = np.stack([take(spec.hf_name.format(i=i), spec.shape[1:], spec.hf_in_axes)
                                   for i in range(cfg.n_layers)])
        else:
            flat[name] = take(spec.hf_name, spec.shape, spec.hf_in_axes)
    # A tied checkpoint may still store lm_head.weight; transformers ignores it too. inv_freq is a RoPE buffer.
    unused = {n for n in tensors.keys() - used if not n.endswith("rotary_emb.inv_freq")}
    unused -= {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unused:
        raise UserError(f"weights with no anychip equivalent: {', '.join(sorted(unused)[:3])}")
    return nest(flat)


def _load_hf_tokenizer(hf_dir: Path, cfg: ModelConfig) -> Any:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json; save the fast tokenizer there (save_pretrained)")
    tokenizer = load_tokenizer(path)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"tokenizer.json has {tokenizer.get_vocab_size()} tokens, the model {cfg.vocab_size}")
    return tokenizer


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken dict {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _chat_template(hf_dir: Path, tok_cfg: dict[str, Any]) -> str | None:
    """transformers 5 saves the template as chat_template.jinja, 4.x inside tokenizer_config.json (a text,
    or a list of named templates of which generation uses "default")."""
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def special_tokens_from_hf(hf_dir: Path, hf: dict[str, Any], tokenizer: Tokenizer) -> SpecialTokens:
    """bos/eos/pad and the chat template of a transformers model directory: the token texts of
    tokenizer_config.json, plus every id generation_config.json (else config.json) names; its eos list is
    what transformers' generate stops at. Names the tokenizer lacks are dropped."""
    tok_cfg = _read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    gen = _read_json(hf_dir / "generation_config.json") if (hf_dir / "generation_config.json").is_file() else {}

    def names(key: str, ids_key: str) -> list[str]:
        ids = gen.get(ids_key, hf.get(ids_key))
        ids = [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)]
        found = [_token_name(tok_cfg.get(key)), *(tokenizer.id_to_token(i) for i in ids)]
        return list(dict.fromkeys(t for t in found if t is not None and tokenizer.token_to_id(t) is not None))

    bos, eos, pad = (names(f"{k}_token", f"{k}_token_id") for k in ("bos", "eos", "pad"))
    return SpecialTokens(bos_token=(bos or [None])[0], eos_tokens=tuple(eos), pad_token=(pad or [None])[0],
                         chat_template=_chat_template(hf_dir, tok_cfg))


def extend_tokenizer(tokenizer: Tokenizer, texts: Iterable[str], n_new: int) -> Tokenizer:
    """Add up to `n_new` tokens that a byte-level BPE trained on `texts` learns first and `tokenizer` lacks.

    Their merges are appended after the existing ones, so they rank last and text the old vocabulary
    already covers keeps (nearly always) its tokenization; new ids follow the old ones.
    """
    data = json.loads(tokenizer.to_str())
    if data["model"].get("type") != "BPE":
        raise UserError(f"vocabulary extension needs a BPE tokenizer, not {data['model'].get('type')}")
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    first_new = next_id = max(tokenizer.get_vocab().values()) + 1
    for merge in json.loads(train_tokenizer(texts, len(vocab) + n_new).to_str())["model"]["merges"]:
        if next_id - first_new == n_new:
            break
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if a + b in vocab or a not in vocab or b not in vocab:  # known, or built from symbols it lacks
            continue
        vocab[a + b] = next_id
        merges.append(f"{a} {b}" if merges and isinstance(merges[0], str) else [a, b])
        next_id += 1
    if next_id == first_new:
        raise UserError("learned no new tokens: the tokenizer is not byte-level or the corpus adds nothing")
    extended = Tokenizer.from_str(json.dumps(data))
    extended.encode_special_tokens = True  # as load_tokenizer does: literal "<|endoftext|>" is text
    return extended


def grow_vocabulary(params: Params, cfg: ModelConfig, first_new: int, n_tokens: int) -> tuple[Params, ModelConfig]:
    """Embedding rows (and lm_head columns) for token ids [first_new, n_tokens), set to the mean of the rows
    before them: new tokens start as an average token instead of noise that would swamp the softmax."""
    vocab_size = max(cfg.vocab_size, n_tokens)

    def grow(table: np.ndarray) -> np.ndarray:  # (V, D) → (vocab_size, D)
        table = np.concatenate([table, np.zeros((vocab_size - len(table), table.shape[1]), table.dtype)])
        table[first_new:n_tokens] = table[:first_new].mean(axis=0)
        return table

    params = dict(params, embed=grow(params["embed"]))
    if not cfg.tie_embeddings:
        params["lm_head"] = grow(params["lm_head"].T).T  # (D, vocab_size)
    return params, dataclasses.replace(cfg, vocab_size=vocab_size)


def write_run(cfg: Config, params: Params, tokenizer: Tokenizer, source: str,
              special_tokens: SpecialTokens | None = None, build_in: Path | None = None) -> Path:
    """A run directory (config.yaml, tokenizer.json, special_tokens.json, checkpoint 0 with a fresh optimizer
    state) at `build_in` (default cfg.run_dir), built in a hidden sibling and renamed: complete, or not there
    at all. Special tokens default to those of an anychip tokenizer."""
    final = Path(cfg.run_dir) if build_in is None else build_in
    trainer = build_trainer(cfg)
    shardings = trainer.state_shardings
    dtype = DTYPES[cfg.compute.param_dtype]
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), params), shardings.params)
    opt_state = jax.jit(trainer.optimizer.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)
    meta = checkpoint_meta(cfg, tokenizer_hash(tokenizer), imported_from=source)
    with atomic_directory(final) as tmp:
        run = RunDir(tmp)
        run.write_files(cfg, tokenizer.to_str(pretty=True),
                        special_tokens=special_tokens or SpecialTokens.defaults(tokenizer))
        ckpt = run.checkpointer(CheckpointConfig(async_save=False))
        try:
            ckpt.save(0, state, meta, tokenizer=tokenizer_json(run.tokenizer))
        finally:
            ckpt.close()
    return final


@contextmanager
def fetched_model_dir(hf_dir: str | Path) -> Iterator[Path]:
    """A model directory to read: a local one as it is; one in object storage as a temporary copy of the
    files import reads (MODEL_FILES and *.safetensors directly inside the prefix: nothing else, so pickle
    weights there are never fetched, only refused)."""
    if not storage.is_remote(hf_dir):
        path = storage.local_path(hf_dir)
        if not path.is_dir():
            raise UserError(f"model directory not found: {hf_dir}")
        yield path
        return
    storage.check_reachable(hf_dir)
    names = storage.listdir(hf_dir)
    wanted = [n for n in names if n in MODEL_FILES or n.endswith(".safetensors")]
    if "config.json" not in wanted:
        raise UserError(f"model directory not found: {hf_dir} (no config.json there)")
    if not any(n.endswith(".safetensors") for n in wanted) and any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise UserError(f"{hf_dir}: refusing to load pickle-based weights; convert to safetensors")
    with tempfile.TemporaryDirectory(prefix="anychip-import-") as tmp:
        local = Path(tmp) / str(hf_dir).rstrip("/").rsplit("/", 1)[-1]
        storage.download_files(str(hf_dir), wanted, local)
        yield local


def import_hf(hf_dir: str | Path, run_dir: str | Path, *, extend_with: list[str] | None = None,
              extra_tokens: int = 0) -> str | Path:
    """Turn a transformers model directory (config.json, *.safetensors, tokenizer.json) into an anychip run
    directory (new or empty) that `generate`, `eval` and `train init_from=` accept. Either may be a URL
    (s3://, gs://): a remote model directory is downloaded first, a remote run directory built locally and
    uploaded as a trainer writes one. Only files inside `hf_dir` are read; a malformed config, index or
    safetensors header is a one-line UserError.

    With `extend_with` (files, folders, globs of a new corpus) the tokenizer gains up to `extra_tokens`
    tokens learned from it, and the embedding grows to match (see `grow_vocabulary`)."""
    storage.check_new_folder(run_dir)
    if bool(extend_with) != (extra_tokens > 0):
        raise UserError("extending the vocabulary needs both a corpus (extend_with) and extra_tokens > 0")
    source = str(hf_dir) if storage.is_remote(hf_dir) else str(storage.local_path(hf_dir).absolute())
    with fetched_model_dir(hf_dir) as local:
        hf = _read_json(local / "config.json")
        model = model_config_from_hf(hf, name=local.resolve().name)
        files = weight_files(local)
        tokenizer = _load_hf_tokenizer(local, model)
        special = special_tokens_from_hf(local, hf, tokenizer)
        params = params_from_hf(read_safetensors(files), model)
    if extend_with:
        first_new = max(tokenizer.get_vocab().values()) + 1
        texts = read_documents(find_files(extend_with), Counter())
        tokenizer = extend_tokenizer(tokenizer, texts, extra_tokens)
        params, model = grow_vocabulary(params, model, first_new, tokenizer.get_vocab_size())
    seq_len = min(TrainConfig.seq_len, model.max_seq_len)
    if not storage.is_remote(run_dir):
        cfg = Config(model=model, optim=CONTINUED_PRETRAINING, train=TrainConfig(seq_len=seq_len),
                     run_dir=str(storage.local_path(run_dir)))
        return write_run(cfg, params, tokenizer, source=source, special_tokens=special)
    with tempfile.TemporaryDirectory(prefix="anychip-import-run-") as tmp:
        # config.yaml names the URL: a trainer started from it works on its own working copy
        cfg = Config(model=model, optim=CONTINUED_PRETRAINING, train=TrainConfig(seq_len=seq_len), run_dir=str(run_dir))
        write_run(cfg, params, tokenizer, source=source, special_tokens=special, build_in=Path(tmp) / "run")
        publish_run(Path(tmp) / "run", str(run_dir))
    return run_dir
