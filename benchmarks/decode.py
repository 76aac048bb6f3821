"""Decode speed: anychip's KV-cache `generate` vs transformers `generate` (static cache + torch.compile).

Both run the same weights in the same process: random anychip params are exported with anychip.hf and
loaded back with `AutoModelForCausalLM.from_pretrained`. Greedy decoding, no stop token, so every row
generates exactly --new-tokens tokens after a --prompt-len prompt. One timed call = one `generate` as a
user sees it (prefill included): ms/token = call time / new tokens, tokens/s = batch · new tokens / call
time; the best of --repeats calls after one untimed warm-up call (whose time, mostly compilation, is
shown as first_s). `agree` is the fraction of generated tokens on which the two greedy outputs match.

    python benchmarks/decode.py                               # CPU: the demo model, fp32
    python benchmarks/decode.py --model 350m --dtype bfloat16  # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM, CompileConfig

from anychip.config import MODEL_PRESETS, ModelConfig
from anychip.interop.hf import hf_config, hf_state_dict, write_safetensors
from anychip.model.generate import generate
from anychip.model.params import init_params


def export(params, cfg: ModelConfig, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(hf_config(cfg)))
    write_safetensors(hf_state_dict(params, cfg), out, max_shard_bytes=2**40)


def timed(fn, repeats: int) -> tuple[float, float, list[list[int]]]:
    """(first call seconds, best of `repeats` later calls, output)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def anychip_runner(params, cfg: ModelConfig, prompts: np.ndarray, new_tokens: int, dtype: str):
    compute_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    prompt_lists = prompts.tolist()
    return lambda: generate(params, cfg, prompt_lists, max_new_tokens=new_tokens, temperature=0,
                            compute_dtype=compute_dtype)


def transformers_runner(model, prompts: np.ndarray, new_tokens: int):
    device = model.device
    ids = torch.tensor(prompts, device=device)
    # reduce-overhead means CUDA graphs; on CPU the default inductor mode. _compile_all_devices lets
    # generate compile on CPU too (by default it only auto-compiles on accelerators).
    compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    compile_config._compile_all_devices = True

    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, cache_implementation="static", compile_config=compile_config,
                pad_token_id=0, eos_token_id=None,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].tolist()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = MODEL_PRESETS[args.model]
    params = init_params(cfg, jax.random.key(0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        export(params, cfg, Path(tmp))
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, args.dtype)).to(device).eval()
    print(f"model {args.model} | {args.dtype} | prompt {args.prompt_len} + {args.new_tokens} new tokens | "
          f"jax {jax.default_backend()} ({jax.devices()[0].device_kind}), torch {device}")
    print(f"{'impl':<28} {'batch':>5} {'first_s':>8} {'ms/token':>9} {'tokens/s':>10} {'agree':>6}")
    rng = np.random.default_rng(0)
    for batch in args.batch:
        prompts = rng.integers(1, cfg.vocab_size, (batch, args.prompt_len))
        results = {
            "anychip (jit, KV cache)": timed(anychip_runner(params, cfg, prompts, args.new_tokens, args.dtype),
                                             args.repeats),
            "transformers static+compile": timed(transformers_runner(hf, prompts, args.new_tokens), args.repeats),
        }
        outputs = [np.array(out) for *_, out in results.values()]
        agree = float(np.mean(outputs[0] == outputs[1]))
        for name, (first, best, _) in results.items():
            print(f"{name:<28} {batch:>5} {first:>8.1f} {1000 * best / args.new_tokens:>9.2f} "
                  f"{batch * args.new_tokens / best:>10.0f} {agree:>6.2f}")


if __name__ == "__main__":
    main()
