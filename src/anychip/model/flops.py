"""FLOPs per token of training, the numerator of MFU and of the planner's compute time.

Forward + backward follow the PaLM appendix-B convention:
    6 · N_matmul + 12 · L · d_attn · T
where N_matmul counts every parameter that takes part in a matmul (`params.matmul_params`: all
weights, the output projection included, but not the input-embedding lookup, which is a gather) and
the second term is the attention score and value matmuls (QKᵀ and PV, 2·2·T·d_attn FLOPs per token per
layer forward, ×3 for forward+backward), with d_attn = n_heads · head_dim. The causal mask is not
discounted, as in PaLM and MaxText, so MFU figures are comparable with theirs.
"""

from __future__ import annotations

from anychip.config import ModelConfig
from anychip.model.params import matmul_params


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of QKᵀ and PV per token, all layers (no causal discount)."""
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), see the module docstring."""
    return 6.0 * matmul_params(cfg) + 3.0 * attention_flops_per_token(cfg, seq_len)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int, remat: str) -> float:
    """Forward FLOPs redone in the backward: under 'full', the layers' matmuls (not the unembedding) and
    attention. The dots policies keep every matmul's output and the flash kernels' (decoder.py)."""
    if remat != "full":
        return 0.0
    return 2.0 * (matmul_params(cfg) - cfg.vocab_size * cfg.d_model) + attention_flops_per_token(cfg, seq_len)
