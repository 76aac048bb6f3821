"""Typed run configuration: one dataclass per component, named model presets, YAML files and dotted overrides.

A config is plain data. It is built from (in order) the defaults, an optional YAML file, then
`key=value` overrides such as `model=350m train.steps=2000 run_dir=runs/a`. Values are parsed
with `yaml.safe_load` (data only, never code) and checked against the field's type. Every
section validates itself in `__post_init__`, so a bad value fails before any compute.

Every field carries a docstring (the string literal under it); `anychip train --help-config` prints
them with the defaults (`describe`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from anychip.errors import UserError, require
from anychip.files import read_text, write_text_atomic
from anychip.jaxenv import cpu_has_bf16


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama/AFM-class decoder (`model.NAME` or a preset: `model=350m`)."""

    name: str = "demo"
    """A label for the model (a preset's name unless set)."""
    vocab_size: int = 8192
    """Rows of the embedding table; at least the tokenizer's vocabulary."""
    d_model: int = 192
    """Width of the residual stream."""
    n_layers: int = 4
    """Decoder blocks."""
    n_heads: int = 6
    """Query heads; head_dim = d_model / n_heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); divides n_heads."""
    d_ff: int = 512
    """Hidden width of the SwiGLU MLP."""
    max_seq_len: int = 1024
    """Longest sequence the model is trained or sampled at."""
    rope_base: float = 10000.0
    """RoPE base frequency (theta)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qk_norm: bool = False
    """RMSNorm of each head's q and k before RoPE (AFM, Qwen3)."""
    tie_embeddings: bool = True
    """The output projection is the embedding table's transpose."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of matrices."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            require(0 < getattr(self, name) < 2**31, f"model.{name} must be in [1, 2**31), got {getattr(self, name)}")
        require(
            self.d_model % self.n_heads == 0,
            f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}",
        )
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}",
        )
        require(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        require(self.rope_base > 1, f"model.rope_base must be > 1, got {self.rope_base}")
        require(self.norm_eps > 0 and self.init_std > 0, "model.norm_eps and model.init_std must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


MODEL_PRESETS: dict[str, ModelConfig] = {
    # A few hundred thousand parameters: unit and CLI tests.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176, max_seq_len=256
    ),
    # ~3M parameters: the built-in default run, sized to finish in < 5 minutes on 2 CPU cores.
    "demo": ModelConfig(),
    "125m": ModelConfig(
        name="125m", vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048,
        max_seq_len=2048, tie_embeddings=True,
    ),
    # The two shapes of the H100 throughput issue (benchmarks/).
    "350m": ModelConfig(
        name="350m", vocab_size=32768, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, d_ff=2816,
        max_seq_len=4096, tie_embeddings=False,
    ),
    "1b": ModelConfig(
        name="1b", vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
        max_seq_len=4096, tie_embeddings=False,
    ),
    # Apple's AFM on-device shape (arXiv 2407.21075, AXLearn honeycrisp "3B").
    "afm-3b": ModelConfig(
        name="afm-3b", vocab_size=49152, d_model=3072, n_layers=26, n_heads=24, n_kv_heads=8, d_ff=8064,
        max_seq_len=32768, rope_base=5e5, qk_norm=True, tie_embeddings=True,
    ),
    # Llama-2-7B and Llama-3-70B shapes.
    "7b": ModelConfig(
        name="7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
        max_seq_len=4096, tie_embeddings=False,
    ),
    "70b": ModelConfig(
        name="70b", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
        max_seq_len=8192, rope_base=5e5, tie_embeddings=False,
    ),
}


@dataclass(frozen=True)
class DataConfig:
    """Where the training tokens come from."""

    path: str | None = None
    """A data dir made by `anychip data prepare` (a path or s3:// gs:// URL); null = the built-in corpus."""
    cache_dir: str = "~/.cache/anychip"
    """Where the built-in corpus is prepared once."""
    verify_checksums: bool = True
    """Check every shard's SHA-256 against the manifest when training starts (reads remote shards once)."""
    mixture: str | None = None
    """A weighted mixture of data dirs instead of data.path: YAML list of {path, weight}, inline or a file."""
    stream_cache_mb: int = 1024
    """Memory for shards read from object storage (block cache with read-ahead), per split."""

    def __post_init__(self) -> None:
        require(self.path is None or self.path != "", "data.path must be a directory or null")
        require(self.path is None or self.mixture is None, "set data.path or data.mixture, not both")
        require(self.stream_cache_mb > 0, f"data.stream_cache_mb must be positive, got {self.stream_cache_mb}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then cosine (or warmup-stable-decay, or constant), gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The schedule ends at lr × min_lr_ratio."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay, warmup-stable-decay (linear cool-down at the end), or constant."""
    decay_fraction: float = 0.2
    """wsd: share of the steps after warmup spent cooling down."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay of matrices (norm gains are never decayed)."""
    b1: float = 0.9
    """AdamW first-moment decay."""
    b2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(0 < self.decay_fraction <= 1, f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
        require(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    """What is trained: steps, batch geometry, the seed of the data order and init, the objective."""

    steps: int = 450
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    batch_size: int = 8
    """Sequences per optimizer step (the global batch, over all devices)."""
    seq_len: int = 256
    """Tokens per sequence."""
    grad_accum: int = 1
    """Microbatches per step: each is batch_size / grad_accum sequences."""
    seed: int = 0
    """Seeds the parameter init and the data order (the batch of step s is a function of seed and s)."""
    z_loss: float = 0.0
    """Weight of the z-loss, mean(logsumexp²) (PaLM): keeps the softmax normaliser near 1."""
    auto_fit: bool = False
    """Pick grad_accum and compute.remat so the step fits device memory (train/memory.py)."""
    document_mask: bool = False
    """Each token attends only to tokens of its own document (documents end at the end-of-text token)."""
    eot_id: int | None = None
    """The end-of-text token id for document_mask; null = the training data tokenizer's."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            require(0 < getattr(self, name) < 2**31, f"train.{name} must be in [1, 2**31), got {getattr(self, name)}")
        require(0 <= self.seed < 2**32, f"train.seed must be in [0, 2**32), got {self.seed}")
        require(
            self.batch_size % self.grad_accum == 0,
            f"train.grad_accum={self.grad_accum} does not divide train.batch_size={self.batch_size}",
        )
        require(self.z_loss >= 0, f"train.z_loss must be >= 0, got {self.z_loss}")
        require(self.eot_id is None or 0 <= self.eot_id < 2**31, f"train.eot_id must be >= 0, got {self.eot_id}")


@dataclass(frozen=True)
class ComputeConfig:
    """How the step is computed: precision, kernels, what the backward recomputes, compilation."""

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Matmul compute dtype (accumulation, the loss and softmax statistics stay fp32); auto: bfloat16, except on
    a CPU without bf16 dot instructions (AVX512-BF16, AMX), where XLA:CPU converts bf16 to fp32 around every op
    and fp32 is faster (jaxenv.cpu_has_bf16)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Master weights (and AdamW state) dtype."""
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    """What the backward pass recomputes: nothing, everything, or all but matmul (and flash-attention) outputs."""
    attention: Literal["auto", "xla", "blockwise", "cudnn", "splash"] = "auto"
    """Attention kernel: auto picks the chip's fast path (cudnn on NVIDIA, splash on TPU, blockwise elsewhere);
    xla is the reference that keeps T×T scores (docs/attention.md)."""
    attention_block: int | Literal["auto"] = "auto"
    """Query/key tile of the blockwise and splash kernels (splash: a multiple of 128); auto: 512, and on CPU
    T/4 within 128..512: up to four key blocks (causal block skipping drops 3/8 of the tiles), none below 128,
    where the tile's matmuls get too small for the CPU's matmul library."""
    layers: Literal["auto", "scan", "unroll"] = "auto"
    """The decoder blocks as one `lax.scan` (compile time flat in depth) or unrolled (XLA fuses and lays out
    across blocks; XLA's cost analysis counts a scan's body once, so FLOP counts need unroll); auto: unrolled on CPU
    up to 8 blocks (faster there), scan otherwise."""
    loss_chunk: int | Literal["auto"] = "auto"
    """Positions per chunk of the fused unembedding + cross-entropy, which never holds the whole batch's
    logits (model/loss.py); 0 = the reference path; auto: 32 on CPU where it divides the sequence (each
    chunk's logits stay in cache), the reference path elsewhere."""
    compile_cache_dir: str | None = "~/.cache/anychip/xla"
    """Persistent XLA compilation cache; null disables it."""

    def __post_init__(self) -> None:
        require(self.attention_block == "auto" or 0 < self.attention_block < 2**20,
                f"compute.attention_block must be positive or auto, got {self.attention_block}")
        require(self.loss_chunk == "auto" or self.loss_chunk >= 0,
                f"compute.loss_chunk must be 0 (off), positive or auto, got {self.loss_chunk}")

    def for_platform(self, platform: str, n_layers: int, seq_len: int) -> ComputeConfig:
        """This config with every `auto` resolved for `platform` ("cpu", "gpu", "tpu", ...), a model of
        `n_layers` blocks and sequences of `seq_len` (docs/model-and-step.md, "CPU")."""
        cpu = platform == "cpu"
        resolved = {
            "dtype": "float32" if cpu and not cpu_has_bf16() else "bfloat16",
            "layers": "unroll" if cpu and n_layers <= 8 else "scan",
            "attention_block": min(512, max(128, seq_len // 4)) if cpu else 512,
            "loss_chunk": 32 if cpu and seq_len % 32 == 0 else 0,
        }
        return dataclasses.replace(self, **{k: v for k, v in resolved.items() if getattr(self, k) == "auto"})


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during training, and the sample printed at the end."""

    every: int = 100
    """Evaluate the held-out split every N steps (and at the start and the end)."""
    batches: int = 8
    """Batches of batch_size sequences per evaluation."""
    sample_tokens: int = 120
    """Tokens of the sample `anychip train` prints at the end (0 = none)."""

    def __post_init__(self) -> None:
        require(self.every > 0 and self.batches > 0, "eval.every and eval.batches must be positive")
        require(self.sample_tokens >= 0, "eval.sample_tokens must be >= 0")


@dataclass(frozen=True)
class LogConfig:
    """The step log: metrics.jsonl, progress lines, TensorBoard, the cost ledger."""

    every: int = 10
    """Write a metrics row and a progress line every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files (pip install 'anychip[tensorboard]')."""
    price_per_hour: float | None = None
    """$ per chip-hour for the cost ledger; null = the catalog's on-demand price of the detected chip."""

    def __post_init__(self) -> None:
        require(self.every > 0, f"log.every must be positive, got {self.every}")
        require(self.price_per_hour is None or self.price_per_hour >= 0, "log.price_per_hour must be >= 0")


@dataclass(frozen=True)
class NonFiniteConfig:
    """A step whose loss or gradient is NaN/Inf changes nothing; after `patience` in a row, act."""

    patience: int = 3
    """Skipped steps in a row before `action` (0 = only skip)."""
    action: Literal["restore", "stop"] = "restore"
    """restore: the newest checkpoint from before them, with a lower learning rate; stop: end the run."""
    lr_factor: float = 0.5
    """Learning-rate multiplier applied at each restore."""

    def __post_init__(self) -> None:
        require(self.patience >= 0, "nonfinite.patience must be >= 0 (0 = only skip)")
        require(0 < self.lr_factor <= 1, "nonfinite.lr_factor must be in (0, 1]")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 takes the devices left over (at most one axis may be -1)."""

    data: int = 1
    """Data parallelism: parameters replicated, gradients all-reduced."""
    fsdp: int = -1
    """Fully sharded data parallelism (ZeRO-3): parameters, gradients and optimizer state split."""
    tensor: int = 1
    """Tensor parallelism (Megatron): heads, MLP hidden and vocabulary split."""

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        require(all(s == -1 or s > 0 for s in sizes), f"mesh sizes must be positive or -1, got {sizes}")
        require(sizes.count(-1) <= 1, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up through `jax.distributed.initialize` (docs/scaling-out.md)."""

    initialize: Literal["auto", "always", "never"] = "auto"
    """auto: when a coordinator is given or a launcher (SLURM, Open MPI, Cloud TPU) started several
    processes; always: let JAX detect the cluster; never (not on/off: YAML reads those as booleans)."""
    coordinator_address: str | None = None
    """host:port of process 0 (else ANYCHIP_COORDINATOR)."""
    num_processes: int | None = None
    """Processes in the job (else ANYCHIP_NUM_PROCESSES)."""
    process_id: int | None = None
    """This process's index (else ANYCHIP_PROCESS_ID)."""
    timeout_s: int = 300
    """Seconds to wait for every process to join."""

    def __post_init__(self) -> None:
        require(self.num_processes is None or self.num_processes > 0, "distributed.num_processes must be > 0")
        require(
            self.process_id is None or 0 <= self.process_id < (self.num_processes or self.process_id + 1),
            f"distributed.process_id={self.process_id} must be in [0, distributed.num_processes)",
        )
        require(self.timeout_s > 0, f"distributed.timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and kept, how runs resume and stop (docs/resume.md)."""

    every_steps: int = 200
    """Save every N steps (0: only at the end and when stopped)."""
    every_minutes: float = 0.0
    """Also save when this much time passed since the last save (0: off)."""
    keep: int = 3
    """Keep the newest N checkpoints ..."""
    keep_every: int = 0
    """... plus every checkpoint whose step is a multiple of this, forever (0: none)."""
    async_save: bool = True
    """Write checkpoints in the background."""
    resume: str = "auto"
    """auto: the newest complete checkpoint; never: refuse to start where checkpoints exist; a step
    number: restart from that checkpoint (newer ones move to checkpoints.rewound/)."""
    on_save_error: Literal["continue", "stop"] = "stop"
    """A checkpoint that cannot be written: stop the run, or continue with a warning."""
    grace_s: float = 25.0
    """After SIGTERM/SIGINT, seconds to finish the step and write the checkpoint before exiting anyway."""
    verify: bool = True
    """Fingerprint arrays at save and check them at restore (silent corruption; ~1 s/GB on CPU)."""

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0 = only at the end)")
        require(self.every_minutes >= 0, "checkpoint.every_minutes must be >= 0 (0 = off)")
        require(self.keep > 0, f"checkpoint.keep must be positive, got {self.keep}")
        require(self.keep_every >= 0, "checkpoint.keep_every must be >= 0 (0 = off)")
        require(self.grace_s > 0, f"checkpoint.grace_s must be positive, got {self.grace_s}")
        require(self.resume in ("auto", "never") or self.resume.isdigit(),
                f"checkpoint.resume must be auto, never or a step number, got {self.resume!r}")


@dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The decoder's shape."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch and objective."""
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    """Precision, kernels, remat."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    """The NaN/Inf guard."""
    mesh: MeshConfig = field(default_factory=MeshConfig)
    """The device mesh."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process start-up."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints, resume and stopping."""
    run_dir: str = "runs/default"
    """Where the run's config, tokenizer, metrics and checkpoints live."""
    init_from: str | None = None
    """A run directory whose newest parameters start this run (continued pretraining); optimizer state is fresh."""

    def __post_init__(self) -> None:
        require(self.run_dir.strip() != "", "run_dir must name a directory, got an empty string")
        require(self.init_from is None or self.init_from.strip() != "", "init_from must be a run directory or null")
        require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        require(self.compute.loss_chunk in ("auto", 0) or self.train.seq_len % self.compute.loss_chunk == 0,
                f"compute.loss_chunk={self.compute.loss_chunk} must be 0 (off) or divide "
                f"train.seq_len={self.train.seq_len}")

    def compute_for(self, platform: str) -> ComputeConfig:
        """The compute settings with every `auto` resolved for `platform` and this model and sequence length."""
        return self.compute.for_platform(platform, self.model.n_layers, self.train.seq_len)


# Keys that moved to another section: an old config file or override gets told where they went.
MOVED = {
    "train.compute_dtype": "compute.dtype", "train.param_dtype": "compute.param_dtype",
    "train.remat": "compute.remat", "train.attention": "compute.attention",
    "train.loss_chunk": "compute.loss_chunk", "train.compile_cache_dir": "compute.compile_cache_dir",
    "train.eval_every": "eval.every", "train.eval_batches": "eval.batches",
    "train.sample_tokens": "eval.sample_tokens", "train.log_every": "log.every",
    "train.tensorboard": "log.tensorboard", "train.price_per_hour": "log.price_per_hour",
    "train.nonfinite_patience": "nonfinite.patience", "train.nonfinite_action": "nonfinite.action",
    "train.nonfinite_lr_factor": "nonfinite.lr_factor",
}


# ---------------------------------------------------------------------------------------------
# Field docstrings


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring}: the string literal under each field of a config dataclass's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "", base: Any = None) -> list[str]:
    """`key = default  # docstring` per setting, section by section: `anychip train --help-config`."""
    base = cls() if base is None else base
    types_, docs, lines, sections = _field_types(cls), field_docs(cls), [], []
    for f in fields(cls):
        value, annotation = getattr(base, f.name), types_[f.name]
        if dataclasses.is_dataclass(annotation):
            sections += ["", f"{prefix}{f.name}: {annotation.__doc__.splitlines()[0]}"]
            sections += describe(annotation, f"{prefix}{f.name}.", value)
        else:
            lines.append(f"  {prefix}{f.name} = {json.dumps(value)}  # {docs.get(f.name, '')}")
    return lines + sections


# ---------------------------------------------------------------------------------------------
# Building configs from data


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and where lossless, convert) a parsed YAML value against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        require(value in allowed, f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        words = [a for a in options if typing.get_origin(a) is Literal]  # int | Literal["auto"]
        if any(value in typing.get_args(a) for a in words):
            return value
        annotation = next(a for a in options if a is not type(None) and a not in words)
    if annotation is bool:
        require(isinstance(value, bool), f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{key}: expected an integer, got {value!r}")
        require(abs(value) < 2**32, f"{key}: {value} is out of range (at most 2**32)")  # JAX holds ints in 32 bits
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}: expected a number, got {value!r}"
        )
        require(math.isfinite(float(value)), f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        require(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key}: expected text")
        return str(value)
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. 'train.steps'."""
    keys = []
    for f in fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(_field_types(cls)[f.name]):
            keys.extend(all_keys(_field_types(cls)[f.name], prefix + f.name + "."))
    return keys


def _unknown_key(key: str) -> UserError:
    if key in MOVED:
        return UserError(f"config key '{key}' is now '{MOVED[key]}'")
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _model_preset(name: Any) -> ModelConfig:
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        close = difflib.get_close_matches(str(name), MODEL_PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown model preset '{name}' (presets: {', '.join(MODEL_PRESETS)}){hint}")
    return MODEL_PRESETS[name]


def _build(cls: type, data: dict[str, Any], prefix: str, base: Any) -> Any:
    """Build dataclass `cls` from `data` on top of `base`, recursing into sub-sections."""
    types_ = _field_types(cls)
    values = {f.name: getattr(base, f.name) for f in fields(cls)}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in types_:
            while isinstance(value, dict) and value:  # name the full dotted key the user typed
                name, value = next(iter(value.items()))
                key += f".{name}"
            raise _unknown_key(key)
        annotation = types_[name]
        if dataclasses.is_dataclass(annotation):
            sub_base = values[name]
            if annotation is ModelConfig and isinstance(value, str):
                value, sub_base = {}, _model_preset(value)
            elif annotation is ModelConfig and isinstance(value, dict) and "preset" in value:
                value = dict(value)
                sub_base = _model_preset(value.pop("preset"))
            require(isinstance(value, dict), f"{key}: expected a mapping of settings")
            values[name] = _build(annotation, value, key + ".", sub_base)
        elif key == "data.mixture" and isinstance(value, list):  # kept as YAML text: data/mixture.py checks it
            values[name] = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
        else:
            values[name] = _coerce(value, annotation, key)
    return cls(**values)


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # e.g. `model=350m model.n_layers=2`
                child = node[part] = {"preset": child}
            node = child
        if isinstance(node.get(leaf), dict) and isinstance(value, str):
            node[leaf]["preset"] = value
        else:
            node[leaf] = value
    return nested


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['train.steps=5', 'model=tiny']` → {'train.steps': 5, 'model': 'tiny'} (values parsed as YAML data)."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        require(bool(sep) and bool(key), f"expected key=value, got '{arg}'")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError):
            out[key.strip()] = raw
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif isinstance(value, dict) and isinstance(merged.get(key), str) and key == "model":
            merged[key] = {"preset": merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← `key=value` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        require(path.is_file(), f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(read_text(path, "config file"))
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except RecursionError:
            raise UserError(f"{path}: nested too deeply to be a config") from None
        require(loaded is None or isinstance(loaded, dict), f"{path}: expected a mapping at the top level")
        data = loaded or {}
    data = _merge(data, _nest(parse_overrides(overrides or [])))
    return _build(Config, data, "", Config())


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def replace(config: Config, **sections: Any) -> Config:
    """`replace(cfg, train={'steps': 10})`: a copy with some fields of some sections changed (validated)."""
    return _build(Config, sections, "", config)
