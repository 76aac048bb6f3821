"""Long-prompt prefill: anychip's `generate` (one new token: the prompt's forward pass into the KV cache) vs
transformers' forward pass over the same prompt, same weights, same process, timed in turns.

The default shape is a 135M Llama (SmolLM-135M: 30 layers, d_model 576, 9 query / 3 key-value heads,
d_ff 1536, vocab 49152) with random weights, fp32, one 4,096-token prompt. anychip's prefill attends with
attention=auto's kernel (blockwise on CPU); transformers uses its default (torch SDPA). Each side is called
once untimed (compilation), then `--repeats` times alternately; the best call of each is reported.

    python benchmarks/prefill.py                       # CPU, 4,096 tokens
    python benchmarks/prefill.py --prompt-len 1024 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from decode import export
from transformers import AutoModelForCausalLM

from anychip.config import ModelConfig
from anychip.model.attention import kernel_for
from anychip.model.generate import generate
from anychip.model.params import init_params

SMOLLM_135M = ModelConfig(name="smollm-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                          d_ff=1536, max_seq_len=8192, tie_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = dataclasses.replace(SMOLLM_135M, max_seq_len=max(SMOLLM_135M.max_seq_len, args.prompt_len + 1))
    params = init_params(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        export(params, cfg, Path(tmp))
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, (1, args.prompt_len))
    ids = torch.tensor(prompt)

    def anychip() -> int:
        return generate(params, cfg, prompt.tolist(), max_new_tokens=1, temperature=0, compute_dtype=jnp.float32)[0][0]

    def transformers() -> int:
        with torch.inference_mode():
            return int(hf(ids).logits[0, -1].argmax())

    runners = {f"anychip ({kernel_for('auto', jnp.float32)})": anychip,
               f"transformers ({hf.config._attn_implementation})": transformers}
    first, best, token = {}, {name: float("inf") for name in runners}, {}
    for name, fn in runners.items():
        t0 = time.perf_counter()
        token[name] = fn()
        first[name] = time.perf_counter() - t0
    for _ in range(args.repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"prefill {args.prompt_len} tokens | {cfg.name} shape, random weights, fp32 | jax {jax.default_backend()}, "
          f"torch {torch.get_num_threads()} threads | load average {os.getloadavg()[0]:.1f}")
    for name in runners:
        print(f"{name:<28} first {first[name]:7.1f} s   best {best[name]:7.2f} s   "
              f"{args.prompt_len / best[name]:8.0f} tokens/s   next token {token[name]}")
    a, t = best.values()
    print(f"anychip / transformers time: {a / t:.2f} (≤ 1: anychip no slower); same next token: "
          f"{len(set(token.values())) == 1}")


if __name__ == "__main__":
    main()
