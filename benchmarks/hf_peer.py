"""The peer: Hugging Face transformers LlamaForCausalLM trained at the same shape, batch and length.

Setup as in the throughput issue: bf16 autocast, SDPA attention, fused AdamW (CUDA; foreach on
CPU), torch.compile. `--dtype float32` drops the autocast: on a CPU without bf16 dot instructions torch's
bf16 path is many times slower than fp32, and fp32 is what anychip's `auto` runs there. Prints one JSON
record on stdout. Used by benchmarks/throughput.py.

    python benchmarks/hf_peer.py --model 1b --batch-size 8 --seq-len 2048
"""

from __future__ import annotations

import json
import time

import torch
from shape_args import shape_parser
from transformers import LlamaConfig, LlamaForCausalLM

from anychip.config import MODEL_PRESETS
from anychip.model.flops import flops_per_token


def llama_config(name: str) -> LlamaConfig:
    m = MODEL_PRESETS[name]
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len, rope_theta=m.rope_base, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa",
    )


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args.model)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, foreach=not cuda)
    forward = model if args.no_compile else torch.compile(model)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = forward(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    step_time = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch_size * args.seq_len / step_time
    print(json.dumps({
        "peer": "transformers", "model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "step_time_s": step_time,
        "tokens_per_s": tokens_per_s, "warmup_and_compile_s": warmup_s, "loss": float(loss),
        "flops_per_token": flops_per_token(MODEL_PRESETS[args.model], args.seq_len),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "torch": torch.__version__, "dtype": args.dtype,
    }))


if __name__ == "__main__":
    main()
