"""Training arithmetic and records: FLOPs per token, MFU, cost, JSONL/TensorBoard writers, progress line.

FLOPs per token (forward + backward) follow the PaLM appendix-B convention:
    6 · N_matmul + 12 · L · d_attn · T
where N_matmul counts every parameter that takes part in a matmul (all weights, including the
output projection, but not the input-embedding lookup, which is a gather) and the second term is
the attention score and value matmuls (QKᵀ and PV, 2·2·T·d_attn FLOPs per token per layer forward,
×3 for forward+backward), with d_attn = n_heads · head_dim. The causal mask is not discounted, as
in PaLM and MaxText, so MFU figures are comparable with theirs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from anychip.config import ModelConfig
from anychip.model import count_params


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in matmuls: all but the norms and the (untied) input embedding table."""
    norms = cfg.n_layers * (2 * cfg.d_model + (2 * cfg.head_dim if cfg.qk_norm else 0)) + cfg.d_model
    return count_params(cfg, include_embedding=cfg.tie_embeddings) - norms


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), see the module docstring."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_flops: float | None, n_chips: int = 1) -> float | None:
    if not peak_flops:
        return None
    return tokens_per_s * flops_token / (peak_flops * n_chips)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsWriter:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl, optionally mirrored to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 - lives as long as the writer, closed in close()
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                from anychip.errors import UserError

                raise UserError("train.tensorboard=true needs tensorboardX: pip install 'anychip[tensorboard]'")
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """One status line per logged step: step, loss, tokens/s, MFU, ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO = sys.stderr):
        self.total, self.start_step, self.stream = total_steps, start_step, stream
        self.t0 = time.perf_counter()

    def update(self, record: dict[str, Any]) -> None:
        step = record["step"]
        elapsed = time.perf_counter() - self.t0
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total - step)
        parts = [f"step {step:>6}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"{record['tokens_per_s']:,.0f} tok/s"]
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        parts.append(f"eta {format_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)
