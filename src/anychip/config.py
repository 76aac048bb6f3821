"""Typed run configuration: dataclasses, named model presets, YAML files and dotted overrides.

A config is plain data. It is built from (in order) the defaults, an optional YAML file, then
`key=value` overrides such as `model=350m train.steps=2000 run_dir=runs/a`. Values are parsed
with `yaml.safe_load` (data only, never code) and checked against the field's type. Every
section validates itself in `__post_init__`, so a bad value fails before any compute.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from anychip.errors import UserError, require


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama/AFM-class decoder. `head_dim` is derived: d_model / n_heads."""

    name: str = "demo"
    vocab_size: int = 8192
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    d_ff: int = 512
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
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
    """Where tokens come from. `path=None` means the built-in corpus: this Python's standard library."""

    path: str | None = None
    cache_dir: str = "~/.cache/anychip"
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        require(self.path is None or self.path != "", "data.path must be a directory or null")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then cosine (or warmup-stable-decay, or constant), gradient clipping."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(0 < self.decay_fraction <= 1, f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: batch geometry, precision, logging, evaluation and checkpoint cadence."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    z_loss: float = 0.0
    # Sequence positions per chunk of the fused unembedding + cross-entropy (kernels/cross_entropy.py), which
    # never holds the whole batch's fp32 logits; 0 = the reference path, which materialises them.
    loss_chunk: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    tensorboard: bool = False
    sample_tokens: int = 120
    # $ per chip-hour for the cost ledger; null = the catalog's on-demand price for the detected chip.
    price_per_hour: float | None = None
    # Pick grad_accum (microbatch size) and remat so the step fits device memory (see sharding.auto_fit).
    auto_fit: bool = False
    # Persistent XLA compilation cache; null or "none" disables it.
    compile_cache_dir: str | None = "~/.cache/anychip/xla"
    # A step whose loss or gradient is NaN/Inf is skipped inside the step (params and optimizer state
    # unchanged). After `nonfinite_patience` skipped steps in a row: "restore" the newest checkpoint from
    # before them with the learning rate times `nonfinite_lr_factor`, or "stop". 0 = only skip.
    nonfinite_patience: int = 3
    nonfinite_action: Literal["restore", "stop"] = "restore"
    nonfinite_lr_factor: float = 0.5

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "eval_batches"):
            require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        require(self.nonfinite_patience >= 0, "train.nonfinite_patience must be >= 0 (0 = only skip)")
        require(0 < self.nonfinite_lr_factor <= 1, "train.nonfinite_lr_factor must be in (0, 1]")
        require(
            self.batch_size % self.grad_accum == 0,
            f"train.grad_accum={self.grad_accum} does not divide train.batch_size={self.batch_size}",
        )
        require(self.z_loss >= 0, f"train.z_loss must be >= 0, got {self.z_loss}")
        require(self.loss_chunk >= 0 and (self.loss_chunk == 0 or self.seq_len % self.loss_chunk == 0),
                f"train.loss_chunk={self.loss_chunk} must be 0 (off) or divide train.seq_len={self.seq_len}")
        require(self.sample_tokens >= 0, "train.sample_tokens must be >= 0")
        require(self.price_per_hour is None or self.price_per_hour >= 0, "train.price_per_hour must be >= 0")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 takes the devices left over (at most one axis may be -1)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        require(all(s == -1 or s > 0 for s in sizes), f"mesh sizes must be positive or -1, got {sizes}")
        require(sizes.count(-1) <= 1, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up through `jax.distributed.initialize` (see README "Scaling out").

    `initialize`: "auto" starts it when a coordinator is given (here or in ANYCHIP_COORDINATOR) or a
    launcher started several processes (SLURM, Open MPI, multi-host Cloud TPU environment variables);
    "always" starts it, leaving what is unset to JAX's cluster auto-detection (SLURM, Open MPI,
    Cloud TPU, Kubernetes with jax[k8s]); "never" does not (not on/off: YAML reads those as booleans).
    Unset fields fall back to ANYCHIP_COORDINATOR, ANYCHIP_NUM_PROCESSES and ANYCHIP_PROCESS_ID.
    """

    initialize: Literal["auto", "always", "never"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self) -> None:
        require(self.num_processes is None or self.num_processes > 0, "distributed.num_processes must be > 0")
        require(
            self.process_id is None or 0 <= self.process_id < (self.num_processes or self.process_id + 1),
            f"distributed.process_id={self.process_id} must be in [0, distributed.num_processes)",
        )
        require(self.timeout_s > 0, f"distributed.timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and kept, how runs resume and stop (README "Resuming and preemption").

    `resume`: "auto" continues from the newest complete checkpoint of run_dir, "never" refuses to
    start where checkpoints exist, a step number restarts from that checkpoint (newer ones are moved
    to checkpoints.rewound/, not deleted). `grace_s`: after SIGTERM/SIGINT, time allowed to finish the
    step and write a checkpoint before the process exits anyway. `verify`: fingerprint every array at
    save and check it at restore (catches silent corruption; milliseconds on accelerators, ~1 s/GB on CPU).
    """

    every_steps: int = 200
    every_minutes: float = 0.0
    keep: int = 3
    keep_every: int = 0
    async_save: bool = True
    resume: str = "auto"
    on_save_error: Literal["continue", "stop"] = "stop"
    grace_s: float = 25.0
    verify: bool = True

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
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = "runs/default"
    init_from: str | None = None

    def __post_init__(self) -> None:
        require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )


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
        annotation = next(a for a in options if a is not type(None))
    if annotation is bool:
        require(isinstance(value, bool), f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{key}: expected an integer, got {value!r}")
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
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _model_preset(name: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
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
        except yaml.YAMLError:
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
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        require(loaded is None or isinstance(loaded, dict), f"{path}: expected a mapping at the top level")
        data = loaded or {}
    data = _merge(data, _nest(parse_overrides(overrides or [])))
    return _build(Config, data, "", Config())


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def replace(config: Config, **sections: Any) -> Config:
    """`replace(cfg, train={'steps': 10})`: a copy with some fields of some sections changed (validated)."""
    return _build(Config, sections, "", config)
