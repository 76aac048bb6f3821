"""The parameter table: every fact about a parameter of the decoder, in one place.

Each parameter has a dotted name ("layers.wq"), logical axes (which `parallel/mesh.py` maps to mesh
axes), a shape, a role and its Hugging Face name and layout. Everything else derives from it: the
parameter pytree's structure, sharding, initialisation, weight decay, the compute-dtype cast when
decoding, FLOP counts and the transformers import/export.

Roles:
    norm        RMSNorm gain: initialised to 1, no weight decay, kept in fp32 when decoding
    embedding   the token table (also the output projection when tied): normal(init_std)
    matrix      a weight matrix: normal(init_std)
    residual    a matrix whose output is added to the residual stream (wo, w_down):
                normal(init_std / sqrt(2·n_layers)), GPT-2's scaling
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp

from anychip.config import ModelConfig

Params = dict[str, Any]
Role = Literal["norm", "embedding", "matrix", "residual"]


@dataclass(frozen=True)
class ParamSpec:
    axes: tuple[str, ...]  # logical axes, one per dimension
    shape: tuple[int, ...]
    role: Role
    hf_name: str  # transformers' tensor name; "{i}" stands for the layer of a stacked ("layers", ...) parameter
    hf_in_axes: int = 0  # leading *input* axes of anychip's layout; HF Linear stores (out, in). 0: as is

    @property
    def stacked(self) -> bool:
        """One slice per layer along a leading "layers" axis (run by the layer scan)."""
        return self.axes[0] == "layers"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def param_table(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter of the decoder `cfg` describes, by dotted name, in pytree order."""
    L, D, H, KV, hd, F, V = (
        cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    )
    attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    table = {
        "embed": ParamSpec(("vocab", "embed"), (V, D), "embedding", "model.embed_tokens.weight"),
        "layers.attn_norm": ParamSpec(("layers", "norm"), (L, D), "norm", "model.layers.{i}.input_layernorm.weight"),
        "layers.wq": ParamSpec(("layers", "embed", "heads", "head_dim"), (L, D, H, hd), "matrix",
                               attn + "q_proj.weight", 1),
        "layers.wk": ParamSpec(("layers", "embed", "kv_heads", "head_dim"), (L, D, KV, hd), "matrix",
                               attn + "k_proj.weight", 1),
        "layers.wv": ParamSpec(("layers", "embed", "kv_heads", "head_dim"), (L, D, KV, hd), "matrix",
                               attn + "v_proj.weight", 1),
        "layers.wo": ParamSpec(("layers", "heads", "head_dim", "embed"), (L, H, hd, D), "residual",
                               attn + "o_proj.weight", 2),
        "layers.mlp_norm": ParamSpec(("layers", "norm"), (L, D), "norm",
                                     "model.layers.{i}.post_attention_layernorm.weight"),
        "layers.w_gate": ParamSpec(("layers", "embed", "mlp"), (L, D, F), "matrix", mlp + "gate_proj.weight", 1),
        "layers.w_up": ParamSpec(("layers", "embed", "mlp"), (L, D, F), "matrix", mlp + "up_proj.weight", 1),
        "layers.w_down": ParamSpec(("layers", "mlp", "embed"), (L, F, D), "residual", mlp + "down_proj.weight", 1),
    }
    if cfg.qk_norm:  # Qwen3's per-head RMSNorm of q and k, before RoPE
        table["layers.q_norm"] = ParamSpec(("layers", "norm"), (L, hd), "norm", attn + "q_norm.weight")
        table["layers.k_norm"] = ParamSpec(("layers", "norm"), (L, hd), "norm", attn + "k_norm.weight")
    table["final_norm"] = ParamSpec(("norm",), (D,), "norm", "model.norm.weight")
    if not cfg.tie_embeddings:
        table["lm_head"] = ParamSpec(("embed", "vocab"), (D, V), "matrix", "lm_head.weight", 1)
    return table


def nest(flat: dict[str, Any]) -> Params:
    """{dotted name: value} → the parameter pytree's nesting ("layers.wq" → tree["layers"]["wq"])."""
    tree: Params = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def named_leaves(params: Params) -> dict[str, Any]:
    """{dotted name: leaf} of a parameter pytree (the keys of `param_table`), in pytree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in flat}


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter; `parallel/mesh.py` maps them to mesh axes."""
    return nest({name: spec.axes for name, spec in param_table(cfg).items()})


def param_shapes(cfg: ModelConfig) -> Params:
    return nest({name: spec.shape for name, spec in param_table(cfg).items()})


def is_norm(cfg: ModelConfig) -> Params:
    """True at every norm gain: no weight decay, no compute-dtype cast."""
    return nest({name: spec.role == "norm" for name, spec in param_table(cfg).items()})


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Normal(0, init_std) matrices, residual-stream outputs scaled by 1/sqrt(2·n_layers), unit norms."""
    table = param_table(cfg)
    names = list(named_leaves(nest(table)))  # pytree order: each parameter's key is the same in every run
    keys = dict(zip(names, jax.random.split(key, len(names))))
    residual_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5

    def init(name: str, spec: ParamSpec) -> jax.Array:
        if spec.role == "norm":
            return jnp.ones(spec.shape, dtype)
        std = residual_std if spec.role == "residual" else cfg.init_std
        return (std * jax.random.normal(keys[name], spec.shape, jnp.float32)).astype(dtype)

    return nest({name: init(name, spec) for name, spec in table.items()})


def count_params(cfg: ModelConfig) -> int:
    return sum(spec.size for spec in param_table(cfg).values())


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul: every matrix, and the embedding table only when it is
    also the output projection (tied); the input lookup is a gather, the norms are elementwise."""
    matmul_roles = ("matrix", "residual", "embedding") if cfg.tie_embeddings else ("matrix", "residual")
    return sum(spec.size for spec in param_table(cfg).values() if spec.role in matmul_roles)
