"""The planner's model of one train step on one device: memory per device and step time, for a job (model,
sequence length, global batch) and a layout (mesh data × fsdp × tensor, grad accumulation, remat). A mesh
counts JAX devices: `step_time` splits a chip of several devices evenly (`Chip.per_device`).
Assumptions (docs/planner.md; none is a measurement):

Memory per device
  * fp32 params, grads and AdamW m, v: 16 B per local parameter, +4 B for the grad accumulator when
    grad_accum > 1 (train/step.py); params shard as `parallel.mesh.PARAM_RULES` says (non-dividing:
    replicated).
  * Activations per token and layer are counted from what JAX saves for the backward pass of
    model/decoder.py under each policy (listed in `_residuals`), × n_layers, plus the larger of one
    layer's backward working set (1× its un-rematerialised residuals, 1.5× under 'full') and the loss's: 8·V
    bytes for fp32 logits and their gradient (with compute.loss_chunk only one chunk's, plus dloss/dh).
    The reference attention saves the T×T scores; a "flash" chip (cuDNN) or a "splash" one (Pallas, TPU:
    per-head tensors padded to 128 lanes, dq written per key block; `_lane_padding`) does not, nor does "blockwise" (model/blockwise.py), which adds its backward's fp32 tiles in
    HBM: score, probability, dP and dS, block² each per local head and sequence of the microbatch.
  * XLA temp-buffer fudge: activations × XLA_TEMP_FUDGE (1.10; none with cuDNN's "flash" under XLA:GPU), and only
    HBM_USABLE of HBM may be planned. Checked against XLA's own memory analysis on CPU (tests/test_planner.py)
    and against libtpu and XLA:GPU compiling for TPU v5e/v5p/v6e and H100/H200 (benchmarks/compile_matrix.py).

Step time per microbatch = max(compute, HBM traffic, FSDP collectives) + FSDP first-layer exposure
+ tensor-parallel all-reduces; per step, × grad_accum, + the optimizer update (HBM-bound).
  * compute = FLOPs / (peak × efficiency). FLOPs = model/flops.py (6N + 12·L·d·T) plus the
    recomputed forward of remat; efficiency is the median MFU of the chip family's published runs
    (cost/published.yaml), DEFAULT_EFFICIENCY (an assumption) where there are none, or calibrated
    from `anychip bench` records (cost/calibration.py).
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

import math
from dataclasses import dataclass
from functools import lru_cache

from anychip.config import ModelConfig
from anychip.cost.hardware import Chip
from anychip.model.flops import flops_per_token, recompute_flops_per_token
from anychip.model.params import param_table
from anychip.parallel.mesh import PARAM_RULES

REMATS = ("none", "dots", "full")
DEFAULT_EFFICIENCY = 0.45  # ASSUMPTION: sustained fraction of peak for chips without a published run
HBM_USABLE = 0.90  # leave 10% for the runtime, allocator fragmentation, collectives' buffers
# XLA temp buffers beyond the counted residuals (copies, fusion outputs, heap fragmentation), by the
# attention kind, which names the compiler too: "flash" is cuDNN under XLA:GPU, "splash" the Pallas kernel
# under libtpu, "xla" and "blockwise" the portable paths (XLA:CPU, libtpu, Neuron). Fitted to the target
# compilers (benchmarks/compile_matrix.py, docs/planner.md "Memory model accuracy"): libtpu needs the 1.10
# with either attention (reference rows -8% to +8% with it; the splash rows were -11% and -15% without),
# XLA:GPU with cuDNN none (1.10 put its rows at +5% to +19%, 1.00 at -2% to +12%).
XLA_TEMP_FUDGE = {"xla": 1.10, "blockwise": 1.10, "splash": 1.10, "flash": 1.00}
HBM_EFF = 0.80  # achieved / peak HBM bandwidth
LINK_EFF = 0.40  # ring bandwidth per chip / quoted aggregate (both-directions) link bandwidth: ½ × 80%
SCALEOUT_EFF = 0.80  # achieved / nominal NIC or DCN bandwidth per chip
LATENCY_IN, LATENCY_OUT = 2e-6, 8e-6  # seconds per ring step (hop) inside / across domains


@dataclass(frozen=True)
class Job:
    cfg: ModelConfig
    tokens: int
    seq_len: int
    batch: int  # global batch, sequences
    compute_bytes: int = 2  # bf16 compute; 4 for float32
    loss_chunk: int = 0  # compute.loss_chunk: positions per chunk of the fused cross-entropy, 0 = off
    attention_block: int = 512  # compute.attention_block: the blockwise kernel's tile edge


@dataclass(frozen=True)
class Layout:
    data: int
    fsdp: int
    tensor: int
    grad_accum: int
    remat: str

    def __str__(self) -> str:
        return f"{self.data}x{self.fsdp}x{self.tensor}"


@lru_cache(maxsize=4096)
def local_params(cfg: ModelConfig, fsdp: int, tensor: int) -> float:
    """Parameters held per device under parallel.mesh.PARAM_RULES (non-dividing axes stay replicated)."""
    sizes = {"fsdp": fsdp, "tensor": tensor}
    total = 0.0
    for spec in param_table(cfg).values():
        n = float(spec.size)
        for name, dim in zip(spec.axes, spec.shape):
            size = sizes.get(PARAM_RULES.get(name) or "", 1)
            n /= size if dim % size == 0 else 1
        total += n
    return total


def _residuals(cfg: ModelConfig, T: int, remat: str, b: int, flash: bool, lane: float = 1.0) -> tuple[float, float]:
    """Bytes JAX saves per token per layer for the backward: (replicated over tensor, split by tensor).

    Read off model.py, checked with jax's residual listing and XLA's CPU buffers. Each RMSNorm keeps
    the fp32 input and normalised value (8·D) plus the compute-dtype copy; attention keeps q, k, v
    after RoPE, its output, and per score an fp32 exp and the probability; SwiGLU keeps gate, up,
    three silu intermediates and their product. 'dots' keeps only matmul outputs (scores and PV in
    fp32), 'full' only the layer input. `b`: compute dtype bytes. `lane`: how much larger the per-head
    tensors (q, k, v, the attention output) are in memory than their elements (TPU: `_lane_padding`).
    """
    D, F, H = cfg.d_model, cfg.d_ff, cfg.n_heads
    Dkv = cfg.n_kv_heads * cfg.head_dim
    if remat == "full":
        return b * D, 0.0
    if remat == "dots":
        attn = lane * b * D + 4 * H if flash else 4 * H * T + 4 * D  # flash: its output and softmax statistics
        return 2 * b * D, lane * (b * D + 2 * b * Dkv) + 2 * b * F + attn
    norm = 8 + (b if b != 4 else 0)  # a separate compute-dtype copy exists only when it is not fp32
    # Scores: fp32 exp + compute-dtype probabilities (8 B per score in fp32 measured on CPU; JAX lists
    # the mask and masked scores too, but XLA keeps neither). Flash keeps only an fp32 log-sum-exp.
    attn = 4 * H if flash else (4 + b) * H * T
    qk = norm * (D + Dkv) if cfg.qk_norm else 0
    return 2 * norm * D, lane * (2 * b * D + 2 * b * Dkv) + 6 * b * F + attn + qk


def _act_per_token(job: Job, remat: str, tensor: int, attention: str) -> tuple[float, float]:
    """(bytes held per token across the whole backward, bytes saved per token) for one device."""
    cfg, b, flash = job.cfg, job.compute_bytes, attention != "xla"
    lane = _lane_padding(cfg) if attention == "splash" else 1.0
    rep, shard = _residuals(cfg, job.seq_len, remat, b, flash, lane)
    saved = cfg.n_layers * (rep + shard / tensor)
    rep0, shard0 = _residuals(cfg, job.seq_len, "none", b, flash, lane)
    # On top of the saved residuals, the peak is either one layer's backward (its residuals recomputed or
    # read, and their cotangents; under 'full' the recomputed forward on top) or the loss: fp32 logits and
    # their gradient (XLA fuses the softmax between them), or with train.loss_chunk one chunk's, plus
    # dloss/dh kept per token. The two are never live together. Fitted to XLA's memory analysis on CPU.
    working = (1.5 if remat == "full" else 1.0) * (rep0 + shard0 / tensor)
    if attention == "blockwise":
        working += _blockwise_tiles(job, tensor) / job.seq_len
    if attention == "splash":
        # The fused backward writes dq once per key block (compute dtype, lane-padded) and sums them after.
        working += -(-job.seq_len // min(job.attention_block, job.seq_len)) * lane * b * cfg.d_model / tensor
    vocab_split = tensor if cfg.vocab_size % tensor == 0 else 1
    logits = 8 * cfg.vocab_size / vocab_split
    if job.loss_chunk:
        logits = logits * job.loss_chunk / job.seq_len + b * cfg.d_model
    head = logits + (8 + b) * cfg.d_model  # + the final norm
    return saved + max(working, head), saved


def _lane_padding(cfg: ModelConfig) -> float:
    """TPU memory tiles put 128 lanes on the minor dimension, and per-head tensors have head_dim there:
    head_dim 64 takes twice its bytes, 16 (tiny) eight times (libtpu's layouts, e.g. bf16[..,64]{..:T(8,128)})."""
    return -(-cfg.head_dim // 128) * 128 / cfg.head_dim


def _blockwise_tiles(job: Job, tensor: int) -> float:
    """Bytes per sequence of the blockwise backward's live tiles: 2 fp32 (block × block) per local head (the
    recomputed probabilities and dS; XLA fuses the scores and dP into them: demo 4 × 1,024, XLA:CPU)."""
    H = job.cfg.n_heads
    heads = H / tensor if H % tensor == 0 else H
    return 8 * heads * min(job.attention_block, job.seq_len) ** 2


def memory_per_device(job: Job, layout: Layout, attention: str = "xla") -> dict[str, float]:
    """Predicted peak bytes per device, by component (see the module docstring); attention: Chip.attention's kinds."""
    cfg, b, t, f = job.cfg, job.compute_bytes, layout.tensor, layout.fsdp
    rows = job.batch / (layout.data * f * layout.grad_accum)
    p = local_params(cfg, f, t)
    states = (16 + (4 if layout.grad_accum > 1 else 0)) * p
    # Without remat the compute-dtype casts of every layer's weights are saved for the backward.
    casts = b * p if layout.remat == "none" and b != 4 else 0.0
    gathered = 2 * b * local_params(cfg, 1, t) / cfg.n_layers if f > 1 else 0.0  # 2 layers all-gathered
    held, _ = _act_per_token(job, layout.remat, t, attention)
    acts = XLA_TEMP_FUDGE[attention] * rows * job.seq_len * held
    return {"states": states, "weight_casts": casts, "gathered": gathered, "activations": acts,
            "total": states + casts + gathered + acts}


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


def step_time(job: Job, chip: Chip, n: int, layout: Layout, sustained_flops: float) -> dict[str, float]:
    """Predicted seconds per optimizer step on `n` JAX devices of `chip`s, each chip sustaining `sustained_flops`,
    with its parts (module docstring). A chip of k devices lends each 1/k of its rates (`Chip.per_device`)."""
    device, sustained_flops = chip.per_device(), sustained_flops / chip.devices_per_chip
    cfg, b = job.cfg, job.compute_bytes
    t, f, ga, L = layout.tensor, layout.fsdp, layout.grad_accum, cfg.n_layers
    tok_mb = job.batch * job.seq_len / (layout.data * f * ga)  # tokens per device (group) per microbatch
    T = job.seq_len
    fpt = flops_per_token(cfg, T) + recompute_flops_per_token(cfg, T, layout.remat)
    compute = fpt * tok_mb / t / sustained_flops
    hbm_bw = (device.hbm_bw or 0) * HBM_EFF
    p_group = local_params(cfg, 1, t)  # params a device computes with (gathered over fsdp)
    _, saved = _act_per_token(job, layout.remat, t, device.attention)
    hbm = (12 * p_group + 3 * saved * tok_mb) / hbm_bw if hbm_bw else 0.0  # weights r/w, acts w+r+grad
    sp = _splits(device, n, layout)
    # Per layer: FSDP all-gathers (fwd, bwd) + reduce-scatter, the DP all-reduce of the grad shard.
    fsdp = 3 * _collective_s(b * p_group, sp["fsdp"], device, L) \
        + 2 * _collective_s(b * p_group / f, sp["data"], device, L)
    tp = 2 * _collective_s(4 * L * tok_mb * cfg.d_model * b, sp["tensor"], device, 4 * L)  # 4 all-reduces/layer
    micro = max(compute, hbm, fsdp) + fsdp / L + tp
    opt = 28 * local_params(cfg, f, t) / hbm_bw if hbm_bw else 0.0  # read p, g, m, v; write p, m, v
    return {"step": ga * micro + opt, "compute": ga * compute, "hbm": ga * hbm, "fsdp": ga * fsdp,
            "tp": ga * tp, "optimizer": opt}

