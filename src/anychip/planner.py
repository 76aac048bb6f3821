"""Plan a pretraining job on every catalog chip: memory per chip, step time, wall time and cost.

For each chip: search mesh layouts (data × fsdp × tensor, as `sharding.py` builds them), grad
accumulation and remat (none / dots / full), drop what does not fit in HBM, keep the fastest.
Assumptions (also in README "Planning a pretraining job"; none is a measurement):

Memory per chip
  * fp32 params, grads and AdamW m, v: 16 B per local parameter, +4 B for the grad accumulator when
    grad_accum > 1 (train.py); params shard as `sharding.PARAM_RULES` says (non-dividing = replicated).
  * Activations per token and layer are counted from what JAX saves for the backward pass of
    model.py under each policy (listed in `_residuals`), × n_layers, plus the larger of one layer's
    backward working set (1× its un-rematerialised residuals, 1.5× under 'full') and the loss's: 8·V
    bytes for fp32 logits and their gradient (with train.loss_chunk only one chunk's, plus dloss/dh).
    The portable attention saves the T×T scores; a "flash" chip does not.
  * XLA temp-buffer fudge: activations × XLA_TEMP_FUDGE, and only HBM_USABLE of HBM may be planned.
    Checked against XLA's own memory analysis on CPU (tests/test_planner.py), not on accelerators.

Step time per microbatch = max(compute, HBM traffic, FSDP collectives) + FSDP first-layer exposure
+ tensor-parallel all-reduces; per step, × grad_accum, + the optimizer update (HBM-bound).
  * compute = FLOPs / (peak × efficiency). FLOPs = metrics.flops_per_token (6N + 12·L·d·T) plus the
    recomputed forward of remat; efficiency is DEFAULT_EFFICIENCY (an assumption) unless calibrated
    from `anychip bench` records.
  * FSDP all-gathers params (fwd and bwd) and reduce-scatters grads every microbatch, in the compute
    dtype, overlapped with compute (XLA async collectives); the DP gradient all-reduce of the shard
    likewise. TP all-reduces (2 fwd + 2 bwd per layer, Megatron) sit on the critical path.
  * Collectives are bandwidth-bound rings, hierarchical over the scale-up domain: the in-domain part
    at LINK_EFF × the quoted chip-to-chip bandwidth, the cross-domain part at SCALEOUT_EFF × the
    catalog's per-chip scale-out bandwidth (400 Gb/s per GPU on EFA/IB, 50 Gb/s DCN per TPU chip,
    200 Gb/s per Trn2 chip ...), plus a latency per ring step (LATENCY_IN / LATENCY_OUT), one
    collective per layer. Mesh axes fill a domain innermost-first: tensor, then fsdp, then data.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax

from anychip.config import ModelConfig, load_config
from anychip.errors import UserError
from anychip.hardware import Catalog, Chip, format_columns, get_chip, load_catalog, match_device_kind
from anychip.metrics import flops_per_token, matmul_params
from anychip.model import param_axes, param_shapes
from anychip.sharding import PARAM_RULES

REMATS = ("none", "dots", "full")
DEFAULT_EFFICIENCY = 0.45  # ASSUMPTION: sustained fraction of peak for the matmul work, every chip alike
DEFAULT_BATCH_TOKENS = 2**22  # ≈4M tokens per step when no global batch is given (Llama-2-style)
HBM_USABLE = 0.90  # leave 10% for the runtime, allocator fragmentation, collectives' buffers
XLA_TEMP_FUDGE = 1.10  # XLA temp buffers beyond the counted residuals (copies, fusion outputs)
HBM_EFF = 0.80  # achieved / peak HBM bandwidth
LINK_EFF = 0.40  # ring bandwidth per chip / quoted aggregate (both-directions) link bandwidth: ½ × 80%
SCALEOUT_EFF = 0.80  # achieved / nominal NIC or DCN bandwidth per chip
LATENCY_IN, LATENCY_OUT = 2e-6, 8e-6  # seconds per ring step (hop) inside / across domains
MAX_CHIPS = 2**17


@dataclass(frozen=True)
class Job:
    cfg: ModelConfig
    tokens: int
    seq_len: int
    batch: int  # global batch, sequences
    compute_bytes: int = 2  # bf16 compute; 4 for float32
    loss_chunk: int = 0  # train.loss_chunk: positions per chunk of the fused cross-entropy, 0 = off


@dataclass(frozen=True)
class Layout:
    data: int
    fsdp: int
    tensor: int
    grad_accum: int
    remat: str

    def __str__(self) -> str:
        return f"{self.data}x{self.fsdp}x{self.tensor}"


@dataclass(frozen=True)
class PlanRow:
    """The best layout of one chip at one chip count; `layout` None = infeasible (see `note`)."""

    chip: str
    chip_name: str
    n_chips: int
    layout: Layout | None
    micro_rows: int = 0  # sequences per chip per microbatch
    memory_bytes: float = math.nan
    hbm_bytes: float | None = None
    step_s: float = math.inf
    mfu: float | None = None
    tokens_per_s_per_chip: float = 0.0
    wall_s: float = math.inf
    cost_usd: float | None = None
    usd_per_mtok: float | None = None
    efficiency: float | None = None
    calibrated: bool = False
    breakdown: dict[str, float] = field(default_factory=dict, compare=False)
    note: str = ""


# Inputs
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_tokens(s: str | float) -> int:
    """'6.3T', '300B', '2e9', 1_000_000 → token count (K/M/B/T are powers of 1000; B = billion)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", str(s).lower())
    value = float(m.group(1)) * _SUFFIX[m.group(2)] if m and m.group(1).count(".") <= 1 else math.nan
    if not math.isfinite(value) or value < 1:
        raise UserError(f"tokens must be a positive count like 6.3T, 300B or 2e9, got '{s}'")
    return round(value)


def parse_duration(s: str | float) -> float:
    """'30d', '12h', '1d12h', '90min', '2w' → seconds (a bare number is seconds)."""
    text = str(s).strip().lower()
    parts = re.findall(r"([0-9.]+)\s*(min|[smhdw]?)", text)
    leftover = re.sub(r"[0-9.]+\s*(min|[smhdw]?)", "", text).strip()
    if not parts or leftover or any(p[0].count(".") > 1 for p in parts):
        raise UserError(f"expected a duration like 30d, 12h or 1d12h, got '{s}'")
    seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"the deadline must be positive, got '{s}'")
    return seconds


def resolve_model(spec: ModelConfig | str) -> ModelConfig:
    """A ModelConfig, a preset name ('afm-3b') or a config YAML file (its `model:` section)."""
    if isinstance(spec, ModelConfig):
        return spec
    if str(spec).endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_config(spec).model
    return load_config(None, [f"model={spec}"]).model


def make_job(model: ModelConfig | str, tokens: int | str, seq_len: int, batch_size: int | None = None,
             compute_dtype: str = "bfloat16") -> Job:
    cfg = resolve_model(model)
    if seq_len <= 0 or seq_len > cfg.max_seq_len:
        raise UserError(f"seq_len must be in 1..{cfg.max_seq_len} for model {cfg.name}, got {seq_len}")
    batch = batch_size if batch_size is not None else max(1, DEFAULT_BATCH_TOKENS // seq_len)
    if batch <= 0:
        raise UserError(f"batch_size must be positive, got {batch}")
    return Job(cfg, parse_tokens(tokens), seq_len, batch, 4 if compute_dtype == "float32" else 2)


# Memory
@lru_cache(maxsize=4096)
def local_params(cfg: ModelConfig, fsdp: int, tensor: int) -> float:
    """Parameters held per chip under sharding.PARAM_RULES (non-dividing axes stay replicated)."""
    sizes = {"fsdp": fsdp, "tensor": tensor}
    total = 0.0
    trees = (param_axes(cfg), param_shapes(cfg))
    for axes, shape in zip(*(jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, tuple)) for t in trees)):
        n = float(math.prod(shape))
        for name, dim in zip(axes, shape):
            size = sizes.get(PARAM_RULES.get(name) or "", 1)
            n /= size if dim % size == 0 else 1
        total += n
    return total


def _residuals(cfg: ModelConfig, T: int, remat: str, b: int, flash: bool) -> tuple[float, float]:
    """Bytes JAX saves per token per layer for the backward: (replicated over tensor, split by tensor).

    Read off model.py, checked with jax's residual listing and XLA's CPU buffers. Each RMSNorm keeps
    the fp32 input and normalised value (8·D) plus the compute-dtype copy; attention keeps q, k, v
    after RoPE, its output, and per score an fp32 exp and the probability; SwiGLU keeps gate, up,
    three silu intermediates and their product. 'dots' keeps only matmul outputs (scores and PV in
    fp32), 'full' only the layer input. `b`: compute dtype bytes.
    """
    D, F, H = cfg.d_model, cfg.d_ff, cfg.n_heads
    Dkv = cfg.n_kv_heads * cfg.head_dim
    if remat == "full":
        return b * D, 0.0
    if remat == "dots":
        attn = b * D + 4 * H if flash else 4 * H * T + 4 * D  # flash: its output and softmax statistics
        return 2 * b * D, b * D + 2 * b * Dkv + 2 * b * F + attn
    norm = 8 + (b if b != 4 else 0)  # a separate compute-dtype copy exists only when it is not fp32
    # Scores: fp32 exp + compute-dtype probabilities (8 B per score in fp32 measured on CPU; JAX lists
    # the mask and masked scores too, but XLA keeps neither). Flash keeps only an fp32 log-sum-exp.
    attn = 4 * H if flash else (4 + b) * H * T
    qk = norm * (D + Dkv) if cfg.qk_norm else 0
    return 2 * norm * D, 2 * b * D + 2 * b * Dkv + 6 * b * F + attn + qk


def _act_per_token(job: Job, remat: str, tensor: int, flash: bool) -> tuple[float, float]:
    """(bytes held per token across the whole backward, bytes saved per token) for one chip."""
    cfg, b = job.cfg, job.compute_bytes
    rep, shard = _residuals(cfg, job.seq_len, remat, b, flash)
    saved = cfg.n_layers * (rep + shard / tensor)
    rep0, shard0 = _residuals(cfg, job.seq_len, "none", b, flash)
    # On top of the saved residuals, the peak is either one layer's backward (its residuals recomputed or
    # read, and their cotangents; under 'full' the recomputed forward on top) or the loss: fp32 logits and
    # their gradient (XLA fuses the softmax between them), or with train.loss_chunk one chunk's, plus
    # dloss/dh kept per token. The two are never live together. Fitted to XLA's memory analysis on CPU.
    working = (1.5 if remat == "full" else 1.0) * (rep0 + shard0 / tensor)
    vocab_split = tensor if cfg.vocab_size % tensor == 0 else 1
    logits = 8 * cfg.vocab_size / vocab_split
    if job.loss_chunk:
        logits = logits * job.loss_chunk / job.seq_len + b * cfg.d_model
    head = logits + (8 + b) * cfg.d_model  # + the final norm
    return saved + max(working, head), saved


def memory_per_chip(job: Job, layout: Layout, flash: bool = False) -> dict[str, float]:
    """Predicted peak bytes per chip, by component (see the module docstring)."""
    cfg, b, t, f = job.cfg, job.compute_bytes, layout.tensor, layout.fsdp
    rows = job.batch / (layout.data * f * layout.grad_accum)
    p = local_params(cfg, f, t)
    states = (16 + (4 if layout.grad_accum > 1 else 0)) * p
    # Without remat the compute-dtype casts of every layer's weights are saved for the backward.
    casts = b * p if layout.remat == "none" and b != 4 else 0.0
    gathered = 2 * b * local_params(cfg, 1, t) / cfg.n_layers if f > 1 else 0.0  # 2 layers all-gathered
    held, _ = _act_per_token(job, layout.remat, t, flash)
    acts = XLA_TEMP_FUDGE * rows * job.seq_len * held
    return {"states": states, "weight_casts": casts, "gathered": gathered, "activations": acts,
            "total": states + casts + gathered + acts}


# Step time
def _splits(chip: Chip, n: int, layout: Layout) -> dict[str, tuple[int, int]]:
    """Each mesh axis → (ranks inside one scale-up domain, ranks across domains), innermost first."""
    cap, out = min(chip.domain, n), {}
    for axis, size in (("tensor", layout.tensor), ("fsdp", layout.fsdp), ("data", layout.data)):
        inside = math.gcd(size, cap)
        out[axis] = (inside, size // inside)
        cap //= inside
    return out


def _collective_s(nbytes: float, split: tuple[int, int], chip: Chip, calls: int = 1) -> float:
    """`calls` reduce-scatters or all-gathers moving `nbytes` in all: hierarchical rings.

    Bandwidth: (r-1)/r of the buffer per chip over each level. Latency: one hop per ring step.
    """
    inside, across = split
    t = 0.0
    if inside > 1:
        bw = (chip.link_bw or 0) * LINK_EFF
        t += (inside - 1) * (nbytes / inside / bw + calls * LATENCY_IN) if bw else math.inf
    if across > 1:
        bw = (chip.scaleout_bw or 0) * SCALEOUT_EFF
        t += (across - 1) * (nbytes / inside / across / bw + calls * LATENCY_OUT) if bw else math.inf
    return t


def _recompute_flops_per_token(cfg: ModelConfig, T: int, remat: str) -> float:
    """Forward FLOPs redone in the backward: under 'full', the layers' matmuls (not the unembedding) and
    attention. The dots policies keep every matmul's output and the flash kernel's (model.py)."""
    if remat != "full":
        return 0.0
    attn_fwd = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    return 2.0 * (matmul_params(cfg) - cfg.vocab_size * cfg.d_model) + attn_fwd


def step_time(job: Job, chip: Chip, n: int, layout: Layout, sustained_flops: float) -> dict[str, float]:
    """Predicted seconds per optimizer step, with its parts (module docstring)."""
    cfg, b, flash = job.cfg, job.compute_bytes, chip.attention == "flash"
    t, f, ga, L = layout.tensor, layout.fsdp, layout.grad_accum, cfg.n_layers
    tok_mb = job.batch * job.seq_len / (layout.data * f * ga)  # tokens per chip (group) per microbatch
    T = job.seq_len
    fpt = flops_per_token(cfg, T) + _recompute_flops_per_token(cfg, T, layout.remat)
    compute = fpt * tok_mb / t / sustained_flops
    hbm_bw = (chip.hbm_bw or 0) * HBM_EFF
    p_group = local_params(cfg, 1, t)  # params a chip computes with (gathered over fsdp)
    _, saved = _act_per_token(job, layout.remat, t, flash)
    hbm = (12 * p_group + 3 * saved * tok_mb) / hbm_bw if hbm_bw else 0.0  # weights r/w, acts w+r+grad
    sp = _splits(chip, n, layout)
    # Per layer: FSDP all-gathers (fwd, bwd) + reduce-scatter, the DP all-reduce of the grad shard.
    fsdp = 3 * _collective_s(b * p_group, sp["fsdp"], chip, L) \
        + 2 * _collective_s(b * p_group / f, sp["data"], chip, L)
    tp = 2 * _collective_s(4 * L * tok_mb * cfg.d_model * b, sp["tensor"], chip, 4 * L)  # 4 all-reduces/layer
    micro = max(compute, hbm, fsdp) + fsdp / L + tp
    opt = 28 * local_params(cfg, f, t) / hbm_bw if hbm_bw else 0.0  # read p, g, m, v; write p, m, v
    return {"step": ga * micro + opt, "compute": ga * compute, "hbm": ga * hbm, "fsdp": ga * fsdp,
            "tp": ga * tp, "optimizer": opt}


# Search
def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _layouts(job: Job, chip: Chip, n: int, remats: Sequence[str]) -> Iterable[tuple[Layout, int]]:
    """(layout with grad_accum=1, sequences per chip per step) for each valid data × fsdp × tensor."""
    cfg = job.cfg
    for t in (1, 2, 4, 8, 16, 32, 64):
        tp_ok = all(x % t == 0 for x in (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff))
        if t > min(chip.domain, n) or n % t or not tp_ok:
            continue  # TP only inside one scale-up domain, on whole heads and MLP columns
        for f in _divisors(n // t):
            d = n // (t * f)
            if cfg.d_model % f or job.batch % (d * f):
                continue  # FSDP must split the embed axis; each batch shard needs whole sequences
            for remat in remats:
                yield Layout(d, f, t, 1, remat), job.batch // (d * f)


def _row(job: Job, chip: Chip, n: int, layout: Layout, s: float, eff: float | None, cal: bool) -> PlanRow:
    parts = step_time(job, chip, n, layout, s)
    step = parts["step"]
    steps = math.ceil(job.tokens / (job.batch * job.seq_len))
    wall = steps * step
    cost = None if chip.price_per_hour is None else wall / 3600 * n * chip.price_per_hour
    model_flops = flops_per_token(job.cfg, job.seq_len) * job.batch * job.seq_len
    return PlanRow(
        chip.key, chip.name, n, layout, job.batch // (layout.data * layout.fsdp * layout.grad_accum),
        memory_per_chip(job, layout, chip.attention == "flash")["total"], chip.hbm_bytes, step,
        None if not chip.peak_bf16_flops else model_flops / (step * n * chip.peak_bf16_flops),
        job.batch * job.seq_len / step / n, wall, cost,
        None if cost is None else cost / (steps * job.batch * job.seq_len / 1e6), eff, cal, parts,
    )


def _sustained(chip: Chip, calibrated: dict[str, float]) -> tuple[float | None, float | None, bool]:
    """(sustained FLOP/s per chip, efficiency vs peak, calibrated?) for one chip."""
    if chip.key in calibrated:
        s = calibrated[chip.key]
        return s, (s / chip.peak_bf16_flops if chip.peak_bf16_flops else None), True
    if not chip.peak_bf16_flops:
        return None, None, False
    eff = chip.efficiency if chip.efficiency is not None else DEFAULT_EFFICIENCY
    return chip.peak_bf16_flops * eff, eff, False


def best_layout(job: Job, chip: Chip, n: int, calibrated: dict[str, float] | None = None,
                remats: Sequence[str] = REMATS) -> PlanRow:
    """The fastest layout that fits, with the largest microbatch that fits for each mesh and remat."""
    s, eff, cal = _sustained(chip, calibrated or {})
    if s is None:
        return PlanRow(chip.key, chip.name, n, None, note="no peak FLOP/s: calibrate or set bf16_tflops")
    budget = HBM_USABLE * chip.hbm_bytes if chip.hbm_bytes else math.inf
    best: PlanRow | None = None
    for base, rows in _layouts(job, chip, n, remats):
        for ga in _divisors(rows):
            layout = replace(base, grad_accum=ga)
            if memory_per_chip(job, layout, chip.attention == "flash")["total"] <= budget:
                row = _row(job, chip, n, layout, s, eff, cal)
                best = row if best is None or row.step_s < best.step_s else best
                break  # more accumulation only adds collectives: the first fit is this layout's best
    if best is None:
        return PlanRow(chip.key, chip.name, n, None, note=f"no layout of batch {job.batch} fits in HBM")
    return best


def _counts(chip: Chip) -> list[int]:
    """Sensible chip counts: powers of two, and whole domains when the domain is not one."""
    counts = {2**k for k in range(18)} | {chip.domain * 2**k for k in range(18)}
    return sorted(c for c in counts if c <= MAX_CHIPS)


def _meet_deadline(job: Job, chip: Chip, deadline_s: float, calibrated: dict[str, float],
                   remats: Sequence[str]) -> PlanRow:
    """The smallest sensible chip count whose best layout finishes within the deadline."""
    s, _, _ = _sustained(chip, calibrated)
    if s is None:
        return best_layout(job, chip, 0, calibrated, remats)  # the "no peak FLOP/s" row
    total_flops = flops_per_token(job.cfg, job.seq_len) * job.tokens
    fastest: PlanRow | None = None
    for n in _counts(chip):
        if n > job.batch * chip.domain or total_flops / (n * s) > deadline_s:
            continue  # even perfect scaling misses the deadline (or the batch cannot be split)
        row = best_layout(job, chip, n, calibrated, remats)
        if row.layout and row.wall_s <= deadline_s:
            return row
        fastest = row if row.layout and (fastest is None or row.wall_s < fastest.wall_s) else fastest
    why = f"fastest {fastest.wall_s / 86400:.1f} d on {fastest.n_chips}" if fastest else "nothing fits"
    return PlanRow(chip.key, chip.name, 0, None, note=f"cannot meet the deadline ({why})")


def _chips(keys: Sequence[str] | None, catalog: Catalog) -> list[Chip]:
    """The chips asked for (default: every training chip with a peak and an HBM size)."""
    if not keys:
        return [c for c in catalog.values() if c.training and c.peak_bf16_flops and c.hbm_bytes]
    chips = [get_chip(k.strip(), catalog) for k in keys]
    for c in chips:
        if not c.training:
            raise UserError(f"{c.key} ({c.name}) is inference-only: the Neuron SDK does not train on it")
    return chips


def _setup(model: ModelConfig | str, tokens: int | str, seq_len: int, batch_size: int | None,
           prices: Sequence, calibration: Sequence, catalog: Catalog | None) -> tuple[Job, Catalog, dict]:
    job = make_job(model, tokens, seq_len, batch_size)
    catalog = catalog if catalog is not None else load_catalog(prices)
    return job, catalog, fit_sustained(load_records(calibration), catalog) if calibration else {}


def _order(row: PlanRow) -> tuple:
    return (row.layout is None, row.note.startswith("over budget"), row.cost_usd is None,
            row.cost_usd or 0.0, row.wall_s)


def plan(model: ModelConfig | str, tokens: int | str, seq_len: int, chips: Sequence[str] | None = None, *,
         num_chips: int | None = None, deadline: float | str | None = None, budget: float | None = None,
         batch_size: int | None = None, prices: Sequence[str | Path] = (),
         calibration: Sequence[str | Path | dict] = (), remats: Sequence[str] = REMATS,
         catalog: Catalog | None = None) -> list[PlanRow]:
    """The best layout per chip, at `num_chips` or at the fewest chips meeting `deadline`, by cost."""
    job, catalog, calibrated = _setup(model, tokens, seq_len, batch_size, prices, calibration, catalog)
    selected = _chips(chips, catalog)
    if not remats or set(remats) - set(REMATS):
        raise UserError(f"remat must be among {', '.join(REMATS)}, got {', '.join(remats) or 'nothing'}")
    if (num_chips is None) == (deadline is None):
        raise UserError("give exactly one of --num-chips N or --deadline (e.g. 30d)")
    if num_chips is not None:
        if num_chips <= 0:
            raise UserError(f"--num-chips must be positive, got {num_chips}")
        rows = [best_layout(job, c, num_chips, calibrated, remats) for c in selected]
    else:
        secs = parse_duration(deadline)
        rows = [_meet_deadline(job, c, secs, calibrated, remats) for c in selected]
        if not any(r.layout for r in rows):
            raise UserError(f"no chip can train {job.tokens:.3g} tokens within {secs / 86400:.3g} days: "
                            + "; ".join(f"{r.chip}: {r.note}" for r in rows))
    if budget is not None:
        rows = [replace(r, note="over budget") if r.cost_usd is not None and r.cost_usd > budget else r
                for r in rows]
    return sorted(rows, key=_order)


def sweep(model: ModelConfig | str, tokens: int | str, seq_len: int, chips: Sequence[str] | None = None, *,
          counts: Sequence[int] = tuple(2**k for k in range(5, 15)), batch_size: int | None = None,
          prices: Sequence[str | Path] = (), calibration: Sequence[str | Path | dict] = (),
          catalog: Catalog | None = None) -> list[PlanRow]:
    """Feasible best rows of each chip at several chip counts: the points of the Pareto plot."""
    job, catalog, calibrated = _setup(model, tokens, seq_len, batch_size, prices, calibration, catalog)
    rows = [best_layout(job, c, n, calibrated) for c in _chips(chips, catalog) for n in counts]
    return [r for r in rows if r.layout]


# Output
def format_plan_table(rows: Sequence[PlanRow]) -> str:
    """A text table, one row per chip (and chip count), in the given order."""
    head = ("chip", "chips", "mesh dxfxt", "micro x accum", "remat", "mem/HBM GB", "step s", "MFU",
            "tok/s/chip", "days", "cost", "$/Mtok", "note")
    out = [head]
    for r in rows:
        if r.layout is None:
            out.append((r.chip, str(r.n_chips or "-")) + ("",) * 10 + (r.note,))
            continue
        hbm = "?" if r.hbm_bytes is None else f"{r.hbm_bytes / 1e9:.0f}"
        eff = f"eff {r.efficiency:.2f}{' cal' if r.calibrated else ''}" if r.efficiency else "calibrated"
        out.append((
            r.chip, f"{r.n_chips:,}", str(r.layout), f"{r.micro_rows} x {r.layout.grad_accum}",
            r.layout.remat, f"{r.memory_bytes / 1e9:.0f}/{hbm}", f"{r.step_s:.2f}",
            "-" if r.mfu is None else f"{100 * r.mfu:.0f}%", f"{r.tokens_per_s_per_chip:,.0f}",
            f"{r.wall_s / 86400:.1f}", "unknown" if r.cost_usd is None else f"${r.cost_usd:,.0f}",
            "-" if r.usd_per_mtok is None else f"{r.usd_per_mtok:.3f}",
            ", ".join(x for x in (eff, r.note) if x),
        ))
    return format_columns(out, left={0, 2, 4, 12})


def pareto_plot(rows: Sequence[PlanRow], path: str | Path, title: str = "") -> Path:
    """Cost vs wall time, one line per chip through its chip counts; the Pareto frontier in black."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global pyplot backend state
    from matplotlib.figure import Figure

    pts = [r for r in rows if r.layout and r.cost_usd is not None]
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in dict.fromkeys(r.chip for r in pts):
        mine = sorted((r for r in pts if r.chip == key), key=lambda r: r.n_chips)
        ax.plot([r.wall_s / 86400 for r in mine], [r.cost_usd for r in mine], "o-", label=key, alpha=0.8)
        for r in mine:
            ax.annotate(str(r.n_chips), (r.wall_s / 86400, r.cost_usd), fontsize=6, alpha=0.6)
    by_time = sorted(pts, key=lambda r: (r.wall_s, r.cost_usd))
    frontier = [r for i, r in enumerate(by_time) if all(r.cost_usd < q.cost_usd for q in by_time[:i])]
    ax.step([r.wall_s / 86400 for r in frontier], [r.cost_usd for r in frontier], "k--", where="post",
            label="Pareto frontier", linewidth=1)
    unpriced = sorted({r.chip for r in rows if r.layout and r.cost_usd is None})
    ax.set(xscale="log", yscale="log", xlabel="wall time (days)", ylabel="cost (USD, list price)",
           title=title + (f"\n(no price: {', '.join(unpriced)})" if unpriced else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


# Calibration from `anychip bench` records
_RECORD_KEYS = ("chip", "model", "seq_len", "batch_size", "n_devices", "mesh", "remat", "step_time_s")


def load_records(sources: Iterable[str | Path | dict]) -> list[dict[str, Any]]:
    """Bench records from JSON files (one record or a list each), or records given as dicts."""
    records: list[dict[str, Any]] = []
    for src in sources:
        if not isinstance(src, dict) and not Path(src).is_file():
            raise UserError(f"calibration file not found: {src}")
        try:
            data = src if isinstance(src, dict) else json.loads(Path(src).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{src}: not valid JSON ({e.msg} at line {e.lineno})") from None
        records.extend(data if isinstance(data, list) else [data])
    for i, r in enumerate(records):
        if missing := [k for k in _RECORD_KEYS if k not in r]:
            raise UserError(f"calibration record {i}: missing {', '.join(missing)}")
    return records


def _case(record: dict[str, Any], catalog: Catalog) -> tuple[Job, Chip, int, Layout]:
    """The planner's view of a measured run: job, chip, chip count, layout (over chips, not devices)."""
    try:
        cfg = ModelConfig(**record["model"])
    except TypeError as e:
        raise UserError(f"calibration record for {record['chip']}: bad model ({e})") from None
    chip = get_chip(record["chip"], catalog)
    matched = match_device_kind(str(record.get("device_kind", "")), catalog)
    per_chip = matched.devices_per_chip if matched and matched.key == chip.key else 1
    mesh = {a: int(record["mesh"].get(a, 1)) for a in ("data", "fsdp", "tensor")}
    for axis in ("fsdp", "data", "tensor"):  # Neuron: a chip's cores count as one device of the mesh
        if per_chip > 1 and mesh[axis] % per_chip == 0:
            mesh[axis] //= per_chip
            per_chip = 1
    remat = record["remat"] if record["remat"] in REMATS else "dots"  # dots_no_batch ≈ dots
    layout = Layout(mesh["data"], mesh["fsdp"], mesh["tensor"], int(record.get("grad_accum", 1)), remat)
    job = Job(cfg, 1, int(record["seq_len"]), int(record["batch_size"]),
              4 if record.get("compute_dtype") == "float32" else 2, int(record.get("loss_chunk", 0)))
    return job, chip, layout.data * layout.fsdp * layout.tensor, layout


def _implied_sustained(record: dict[str, Any], catalog: Catalog) -> float:
    """The sustained FLOP/s per chip at which the model reproduces the measured step time (bisection)."""
    job, chip, n, layout = _case(record, catalog)
    target = float(record["step_time_s"])
    lo, hi = 1e3, 1e19
    if step_time(job, chip, n, layout, hi)["step"] >= target:
        return math.inf  # communication/memory alone already explain the time: compute cannot be fitted
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if step_time(job, chip, n, layout, mid)["step"] > target else (lo, mid)
    return math.sqrt(lo * hi)


def fit_sustained(records: Sequence[dict[str, Any]], catalog: Catalog | None = None) -> dict[str, float]:
    """Per chip: the median over its records of the implied sustained FLOP/s.

    One scalar per chip, not a curve in arithmetic intensity: a bench run measures the shape the user
    is about to train, records are few, and a median is robust to one noisy run. Its limit: a scalar
    fitted on a small model overstates the step time of a much larger one (matmul efficiency grows
    with size), so calibrate with the shape you plan, and read the leave-one-out error in the report.
    """
    catalog = catalog if catalog is not None else load_catalog()
    implied: dict[str, list[float]] = {}
    for r in records:
        s = _implied_sustained(r, catalog)
        if math.isfinite(s):
            implied.setdefault(r["chip"], []).append(s)
    return {k: statistics.median(v) for k, v in implied.items()}


def calibration_report(records: Sequence[dict[str, Any]], catalog: Catalog | None = None) -> list[dict]:
    """Per record: measured step time, the prediction with the default efficiency and after fitting.

    The fitted prediction for a record uses only the chip's other records (leave-one-out) when there
    are any, so its error is an honest out-of-sample figure; with one record it is in-sample (= 0).
    """
    catalog = catalog if catalog is not None else load_catalog()
    out = []
    for i, r in enumerate(records):
        job, chip, n, layout = _case(r, catalog)
        measured, implied = float(r["step_time_s"]), _implied_sustained(r, catalog)
        others = [x for j, x in enumerate(records) if j != i and x["chip"] == r["chip"]]
        fitted = fit_sustained(others or [r], catalog).get(chip.key)
        preds = {"default": _sustained(chip, {})[0], "fit": fitted}
        preds = {k: step_time(job, chip, n, layout, v)["step"] if v else None for k, v in preds.items()}
        out.append({
            "chip": chip.key, "model": job.cfg.name, "seq_len": job.seq_len, "batch_size": job.batch,
            "n_chips": n, "mesh": str(layout), "remat": layout.remat, "measured_s": measured,
            "predicted_default_s": preds["default"], "predicted_fit_s": preds["fit"],
            "error_default": None if preds["default"] is None else preds["default"] / measured - 1,
            "error_fit": None if preds["fit"] is None else preds["fit"] / measured - 1,
            "fit": "leave-one-out" if others else "in-sample",
            "implied_efficiency": implied / chip.peak_bf16_flops if chip.peak_bf16_flops else None,
            "implied_tflops": implied / 1e12,
        })
    return out


def format_calibration_table(rows: Sequence[dict[str, Any]]) -> str:
    """Measured vs predicted step time per record, before and after fitting the efficiency."""
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    out = [("chip", "model", "batch x seq", "mesh", "remat", "measured s", "default s", "err", "fitted s",
            "err", "eff")]
    out += [(r["chip"], r["model"], f"{r['batch_size']} x {r['seq_len']}", r["mesh"], r["remat"],
             f(r["measured_s"], ".4f"), f(r["predicted_default_s"], ".4f"), f(r["error_default"], "+.0%"),
             f(r["predicted_fit_s"], ".4f"), f(r["error_fit"], "+.0%"), f(r["implied_efficiency"], ".2f"))
            for r in rows]
    return format_columns(out, left={0, 1, 3, 4})
