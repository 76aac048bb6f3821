"""The train state, the jitted train step, and the loop around it.

Data flow: TokenDataset.batch(step) → global_batch (sharded over the mesh) → train_step → metrics
(read one step late, so the host never waits on the device) and, every N steps, eval and a
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from anychip import __version__, checkpoint, hardware, memory, sharding
from anychip.config import Config, load_config, replace, save_config, to_dict
from anychip.data import TokenDataset, builtin_corpus, sha256_file
from anychip.errors import UserError
from anychip.kernels.attention import resolve as resolve_attention
from anychip.kernels.cross_entropy import chunked_cross_entropy
from anychip.metrics import Discard, MetricsWriter, StepLogger
from anychip.model import (
    cross_entropy,
    forward,
    hidden_states,
    init_params,
    param_axes,
    param_shapes,
    unembedding,
)
from anychip.optim import learning_rate_schedule, make_optimizer
from anychip.preemption import PREEMPTED_EXIT_CODE, Preempted, SaveSchedule, StopSignals
from anychip.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# sysexits EX_TEMPFAIL ("try again"): stopped by SIGTERM/SIGINT after writing a checkpoint; rerun to resume.
MAX_NONFINITE_RESTORES = 3  # per process: a run that keeps diverging after this many restores stops


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


class LrScaleState(NamedTuple):
    scale: jax.Array  # () float32: learning-rate multiplier, lowered by the non-finite guard


def scale_learning_rate() -> optax.GradientTransformation:
    """Multiply the updates by a factor held in the optimizer state, so that it is checkpointed and a
    resumed run uses the same one. AdamW's update (weight decay included) is proportional to the
    learning rate, so this scales the learning rate; at 1.0 it changes no bit."""

    def update(updates: Any, state: LrScaleState, params: Any = None) -> tuple[Any, LrScaleState]:
        return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: LrScaleState(jnp.ones((), jnp.float32)), update)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def lr_scale(state: TrainState) -> float:
    return float(state.opt_state[-1].scale)


def with_lr_scale(state: TrainState, scale: float, trainer: Trainer) -> TrainState:
    value = jax.device_put(jnp.float32(scale), trainer.state_shardings.opt_state[-1].scale)
    return state._replace(opt_state=(*state.opt_state[:-1], LrScaleState(value)))


class Trainer(NamedTuple):
    """Everything built once from a config: the mesh, the optimizer, shardings and jitted functions."""

    cfg: Config
    mesh: Mesh
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    init: Callable[[jax.Array], TrainState]
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    eval_loss: Callable[[Any, jax.Array], jax.Array]


def model_kwargs(cfg: Config) -> dict[str, Any]:
    compute_dtype = DTYPES[cfg.train.compute_dtype]
    impl = resolve_attention(cfg.train.attention)
    if impl == "cudnn" and compute_dtype == jnp.float32:
        impl = "xla"  # cuDNN flash attention takes bf16/fp16 only
    return {"compute_dtype": compute_dtype, "remat": cfg.train.remat, "attention_impl": impl}


def loss_fn(params: Any, tokens: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """tokens (B, T+1) → (loss with z-loss, plain cross-entropy)."""
    inputs, targets, t = tokens[:, :-1], tokens[:, 1:], cfg.train
    if t.loss_chunk:
        h = hidden_states(params, inputs, cfg.model, **model_kwargs(cfg))
        return chunked_cross_entropy(h, unembedding(params, cfg.model), targets, chunk=t.loss_chunk,
                                     z_loss=t.z_loss)
    logits = forward(params, inputs, cfg.model, **model_kwargs(cfg))  # (B, T, V) fp32
    return cross_entropy(logits, targets, t.z_loss)


def grads_and_loss(params: Any, batch: jax.Array, cfg: Config) -> tuple[Any, jax.Array]:
    """Mean gradient and cross-entropy over the batch, accumulated over `grad_accum` microbatches."""
    grad_fn = jax.grad(lambda p, b: loss_fn(p, b, cfg), has_aux=True)
    n = cfg.train.grad_accum
    if n == 1:
        return grad_fn(params, batch)
    # Microbatch i takes rows i, i+n, i+2n, ...: every device holds B/(n·devices) rows of each microbatch
    # already, so the split moves no data (a plain (n, B/n) reshape would put microbatch 0 on the first
    # devices only and make XLA reshuffle rows across the mesh). The mean gradient is the same.
    micro = batch.reshape(batch.shape[0] // n, n, batch.shape[1]).swapaxes(0, 1)  # (n, B/n, T+1)

    def accumulate(carry, mb):
        grads, ce = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, (grads, ce)), None

    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros((), jnp.float32))
    (grads, ce), _ = jax.lax.scan(accumulate, zeros, micro)
    return jax.tree.map(lambda g: g / n, grads), ce / n


def build_trainer(cfg: Config, mesh: Mesh | None = None) -> Trainer:
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh  # an AbstractMesh lowers without devices
    sharding.check_batch(mesh, cfg.train.batch_size, cfg.train.grad_accum)
    optimizer = optax.chain(make_optimizer(cfg.optim, cfg.train.steps), scale_learning_rate())
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    p_shard = sharding.param_shardings(param_axes(cfg.model), param_shapes(cfg.model), mesh)
    repl = sharding.replicated(mesh)

    def init(key: jax.Array) -> TrainState:
        params = init_params(cfg.model, key, DTYPES[cfg.train.param_dtype])
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract_opt = jax.eval_shape(optimizer.init, jax.eval_shape(init, jax.random.key(0)).params)
    opt_shard = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, p_shard, transform_non_params=lambda _: repl
    )
    shardings = TrainState(repl, p_shard, opt_shard)

    def train_step(state: TrainState, batch: jax.Array):
        grads, ce = grads_and_loss(state.params, batch, cfg)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Non-finite guard: a NaN/Inf loss or gradient keeps the old params and optimizer state. A select,
        # not lax.cond: the portable step has no control flow (Trainium), and a select is bit-exact.
        finite = jnp.isfinite(ce) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        lr = schedule(state.step) * state.opt_state[-1].scale
        metrics = {"loss": ce, "grad_norm": grad_norm, "lr": lr, "skipped": 1.0 - finite.astype(jnp.float32)}
        return TrainState(state.step + 1, params, opt_state), metrics

    def eval_loss(params: Any, batch: jax.Array) -> jax.Array:
        return loss_fn(params, batch, cfg)[1]

    batch_shard = sharding.batch_sharding(mesh)
    train_step = sharding.with_activation_sharding(train_step, mesh)  # the model's constrain() calls use mesh
    eval_loss = sharding.with_activation_sharding(eval_loss, mesh)
    return Trainer(
        cfg, mesh, optimizer, shardings,
        init=jax.jit(init, out_shardings=shardings),
        step=jax.jit(train_step, in_shardings=(shardings, batch_shard), out_shardings=(shardings, repl),
                     donate_argnums=0),
        eval_loss=jax.jit(eval_loss, in_shardings=(p_shard, batch_shard), out_shardings=repl),
    )


def abstract_state(trainer: Trainer) -> TrainState:
    shapes = jax.eval_shape(trainer.init, jax.random.key(0))
    return checkpoint.abstract_like(shapes, trainer.state_shardings)


# ---------------------------------------------------------------------------------------------
# Data


def data_dir_for(cfg: Config, log: Callable[[str], None] = print) -> Path:
    if cfg.data.path is not None:
        return Path(cfg.data.path)
    return builtin_corpus(cfg.data.cache_dir, vocab_size=min(cfg.model.vocab_size, 8192), log=log)


def open_datasets(cfg: Config, data_dir: Path) -> tuple[TokenDataset, TokenDataset]:
    train_ds = TokenDataset(data_dir, "train", verify=cfg.data.verify_checksums)
    val_ds = TokenDataset(data_dir, "val", verify=cfg.data.verify_checksums)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"the tokenizer of {data_dir} has {train_ds.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size={train_ds.vocab_size} or prepare the data with a "
            "smaller vocabulary"
        )
    return train_ds, val_ds


def evaluate(trainer: Trainer, params: Any, ds: TokenDataset, max_batches: int | None,
             byte_lengths: np.ndarray | None = None) -> dict[str, float]:
    """Held-out cross-entropy over up to `max_batches` sequential batches of `ds`.

    With `byte_lengths` (UTF-8 bytes per token id) also bits per byte, which compares across tokenizers.
    """
    cfg = trainer.cfg.train
    nats, tokens, n_bytes = 0.0, 0, 0
    index, count = sharding.data_shard(trainer.mesh, cfg.batch_size)  # this process's rows of each batch
    for rows in ds.eval_batches(cfg.batch_size, cfg.seq_len, max_batches, index, count):
        batch = sharding.global_batch(rows, trainer.mesh, rows.shape[0] * count)
        n = batch.shape[0] * cfg.seq_len
        nats += float(trainer.eval_loss(params, batch)) * n
        tokens += n
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[rows[:, 1:]].sum()) * count
    result = {"eval_loss": nats / max(tokens, 1), "eval_tokens": tokens}
    result["perplexity"] = math.exp(min(result["eval_loss"], 700.0))
    if byte_lengths is not None:
        result["bits_per_byte"] = nats / math.log(2) / max(n_bytes, 1)
    return result


def evaluate_run(run_dir: str | Path, data: str | None = None, max_batches: int | None = None) -> dict[str, float]:
    """`anychip eval`: held-out loss, perplexity and bits per byte of a run's newest checkpoint."""
    cfg, params, tokenizer = load_run(run_dir)
    if data is not None:
        cfg = replace(cfg, data={"path": data})
    _, val_ds = open_datasets(cfg, data_dir_for(cfg))
    if val_ds.manifest["tokenizer_sha256"] != tokenizer_hash(tokenizer):
        raise UserError(f"{val_ds.data_dir} was tokenized with a different tokenizer than the run {run_dir}")
    trainer = build_trainer(cfg)
    return evaluate(trainer, params, val_ds, max_batches, token_byte_lengths(tokenizer))


# ---------------------------------------------------------------------------------------------
# The loop


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[Config, Any, Any]:
    """(config, params on this process's devices, tokenizer) of a run directory's newest checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    # The saved mesh may not fit this machine's devices; eval and generation need no particular layout.
    cfg = replace(load_config(run_dir / "config.yaml"), mesh={"data": 1, "fsdp": -1, "tensor": 1})
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", async_save=False)
    if not ckpt.all_steps():
        raise UserError(f"{run_dir} has no checkpoint")
    abstract = abstract_state(build_trainer(cfg))
    if step is None:  # the newest that restores intact (a damaged one is moved aside with a warning)
        step, state, _ = ckpt.restore_newest(abstract)  # type: ignore[misc]
    else:
        state, _ = ckpt.restore(step, abstract)
    tokenizer = _run_tokenizer(run_dir, ckpt, step)
    ckpt.close()
    return cfg, state.params, tokenizer


def _run_tokenizer(run_dir: Path, ckpt: checkpoint.Checkpointer, step: int) -> Any:
    """The run's tokenizer.json, else the copy inside the checkpoint (a checkpoint copied on its own)."""
    if (run_dir / "tokenizer.json").is_file() or (stored := ckpt.read_tokenizer(step)) is None:
        return load_tokenizer(run_dir / "tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(stored), encoding="utf-8")
        return load_tokenizer(Path(tmp) / "tokenizer.json")


def open_checkpointer(cfg: Config, log: Callable[[str], None] = print) -> checkpoint.Checkpointer:
    c = cfg.checkpoint
    return checkpoint.Checkpointer(Path(cfg.run_dir) / "checkpoints", keep=c.keep, keep_every=c.keep_every,
                                   async_save=c.async_save, on_save_error=c.on_save_error, verify=c.verify,
                                   log=log)


def resume_step(cfg: Config, ckpt: checkpoint.Checkpointer) -> int | None:
    """The checkpoint `checkpoint.resume` asks for (None: start fresh), decided before run_dir changes."""
    steps, mode = ckpt.all_steps(), cfg.checkpoint.resume
    if mode == "never" and steps:
        raise UserError(f"{ckpt.directory} already holds checkpoints (steps {steps[0]}..{steps[-1]}) and "
                        "checkpoint.resume=never; choose a new run_dir (nothing was changed)")
    if mode in ("auto", "never"):
        return steps[-1] if steps and mode == "auto" else None
    if int(mode) not in steps:
        raise UserError(f"checkpoint.resume={mode}: {ckpt.directory} has no checkpoint {mode} "
                        f"(it has {steps})")
    return int(mode)


def resume(trainer: Trainer, ckpt: checkpoint.Checkpointer, step: int,
           log: Callable[[str], None]) -> tuple[TrainState, dict[str, Any]]:
    """Restore checkpoint `step`: with resume=auto the newest that restores intact, else exactly `step`,
    moving newer checkpoints to checkpoints.rewound/ (the steps ahead will be saved again)."""
    if trainer.cfg.checkpoint.resume == "auto":
        found = ckpt.restore_newest(abstract_state(trainer), max_step=step)
        if found is None:  # all vanished since resume_step listed them
            raise UserError(f"the checkpoints in {ckpt.directory} disappeared while resuming")
        step, state, meta = found
    else:
        state, meta = ckpt.restore(step, abstract_state(trainer))
        newer = [s for s in ckpt.all_steps() if s > step]
        if newer:
            where = ckpt.set_aside(newer, "rewound")
            metrics = Path(trainer.cfg.run_dir) / "metrics.jsonl"
            if metrics.is_file():
                shutil.copyfile(metrics, where / f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            log(f"rewinding to step {step}: moved checkpoints {newer} and a copy of metrics.jsonl to {where}")
    changed = config_changes(meta.get("config", {}), to_dict(trainer.cfg))
    log(f"resumed from {ckpt.directory}/{step}" + (f" with changed settings: {changed}" if changed else ""))
    return state, meta


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """'train.steps 100 -> 200, ...' for the settings that differ (checkpoint.resume aside)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.append(config_changes(a, b, f"{prefix}{key}."))
        elif a != b and f"{prefix}{key}" != "checkpoint.resume":
            changes.append(f"{prefix}{key} {a} -> {b}")
    return ", ".join(c for c in changes if c)


def check_same_data(meta: dict[str, Any], data_dir: Path, train_ds: TokenDataset,
                    log: Callable[[str], None]) -> None:
    """A resumed run must read the same tokens: a new tokenizer is an error, new data a warning."""
    if meta.get("tokenizer_sha256") not in (None, train_ds.manifest["tokenizer_sha256"]):
        raise UserError(f"{data_dir} was tokenized with another tokenizer than checkpoint {meta.get('step')} "
                        "of this run_dir was trained with; use the run's data or start a new run_dir")
    if meta.get("data_manifest_sha256") not in (None, sha256_file(data_dir / "manifest.json")):
        log(f"warning: {data_dir} is not the data checkpoint {meta.get('step')} was trained on (manifest "
            "differs): training goes on, but the data order does not continue exactly")


def check_init_tokenizer(cfg: Config, train_ds: TokenDataset) -> None:
    """`init_from` weights only make sense on data tokenized with the tokenizer they were trained with."""
    if not cfg.init_from:
        return
    path = Path(cfg.init_from) / "tokenizer.json"
    if path.is_file() and tokenizer_hash(load_tokenizer(path)) != train_ds.manifest["tokenizer_sha256"]:
        raise UserError(f"{train_ds.data_dir} was tokenized with another tokenizer than init_from={cfg.init_from}; "
                        f"prepare it with: anychip data prepare ... --tokenizer {path}")


def start_state(trainer: Trainer, ckpt: checkpoint.Checkpointer,
                log: Callable[[str], None]) -> tuple[TrainState, dict[str, Any] | None]:
    """(state, its checkpoint's meta): resumed as `checkpoint.resume` says, else from `init_from` params,
    else initialised (meta None)."""
    cfg = trainer.cfg
    step = resume_step(cfg, ckpt)
    if step is not None:
        return resume(trainer, ckpt, step, log)
    state = trainer.init(jax.random.key(cfg.train.seed))
    if cfg.init_from:
        # Orbax restores whole trees only, and the source's optimizer-state layout follows the source's
        # own config (e.g. grad_clip adds a chain): load_run restores with that, then keep the params.
        source_cfg, params, _ = load_run(cfg.init_from)
        if param_shapes(source_cfg.model) != param_shapes(cfg.model):
            raise UserError(f"init_from={cfg.init_from}: its model ({source_cfg.model.name}) has other "
                            f"parameter shapes than this run's model ({cfg.model.name})")
        params = jax.tree.map(lambda p, own: p.astype(own.dtype), params, state.params)
        state = state._replace(params=jax.device_put(params, trainer.state_shardings.params))
        log(f"initialised parameters from {cfg.init_from}; optimizer state is fresh")
    return state, None


def prepare_run_dir(cfg: Config, data_dir: Path, train_ds: TokenDataset) -> Path:
    run_dir = Path(cfg.run_dir)
    if not sharding.is_main_process():  # one writer per run; the other processes only read
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    shutil.copyfile(train_ds.tokenizer_path, run_dir / "tokenizer.json")
    shutil.copyfile(data_dir / "manifest.json", run_dir / "data_manifest.json")
    return run_dir


def checkpoint_meta(cfg: Config, data_dir: Path, train_ds: TokenDataset) -> dict[str, Any]:
    """What a checkpoint records besides the arrays (the loop adds the data position and metrics length)."""
    return {
        "config": to_dict(cfg), "data_seed": cfg.train.seed, "anychip_version": __version__,
        "tokenizer_sha256": train_ds.manifest["tokenizer_sha256"],
        "data_manifest_sha256": sha256_file(data_dir / "manifest.json"),
    }


def truncate_metrics(run_dir: Path, meta: dict[str, Any] | None, log: Callable[[str], None]) -> None:
    """Cut metrics.jsonl back to its length when the restored checkpoint was written (empty when starting
    fresh): rows a killed run wrote after its last checkpoint are written again, identically, on resume."""
    path, keep = run_dir / "metrics.jsonl", 0 if meta is None else meta.get("metrics_bytes")
    if keep is None or not path.is_file() or jax.process_index() != 0:
        return
    if path.stat().st_size < keep:
        log(f"warning: {path} is shorter than when checkpoint {meta and meta.get('step')} was written; "
            "left as is")
    elif path.stat().st_size > keep:
        os.truncate(path, keep)


def start_up(cfg: Config, log: Callable[[str], None]) -> tuple[Config, Callable[[str], None]]:
    """Before any JAX computation: jax.distributed (multi-process runs), the persistent compilation
    cache, then train.auto_fit. Returns the config to run and this process's log: only process 0
    prints, the others would repeat it."""
    sharding.initialize_distributed(cfg.distributed, log)
    sharding.enable_compile_cache(cfg.train.compile_cache_dir)
    log = log if sharding.is_main_process() else (lambda _message: None)
    return (memory.auto_fit(cfg, jax.device_count(), log) if cfg.train.auto_fit else cfg), log


def compile_step(trainer: Trainer, state: TrainState, batch: jax.Array,
                 log: Callable[[str], None]) -> Callable:
    """AOT-compile the train step: the planner's memory estimate before, compile time and XLA's memory
    analysis after (a persistent-cache hit shows as a short compile)."""
    log(memory.format_estimate(memory.estimate(trainer.cfg, dict(trainer.mesh.shape))))
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, batch).compile()
    log(f"compiled the train step in {time.perf_counter() - t0:.1f}s")
    peak, summary = memory.xla_peak_bytes(compiled)
    log(summary)
    memory.check_fits(peak, log)
    return compiled


class NonFiniteError(UserError):
    """The loss or gradients stayed NaN/Inf for train.nonfinite_patience steps and no restore was possible."""


class Loop:
    """The steps of one `train` call: batches, eval, checkpoints, stop signals and the non-finite guard."""

    def __init__(self, trainer: Trainer, ckpt: checkpoint.Checkpointer, writer: Any, logger: StepLogger,
                 datasets: tuple[TokenDataset, TokenDataset], meta: dict[str, Any],
                 log: Callable[[str], None]):
        self.trainer, self.cfg, self.ckpt, self.writer = trainer, trainer.cfg, ckpt, writer
        self.logger = logger
        (self.train_ds, self.val_ds), self.meta, self.log = datasets, meta, log
        self.byte_lengths = token_byte_lengths(load_tokenizer(self.train_ds.tokenizer_path))
        self.tokenizer = checkpoint.tokenizer_json(self.train_ds.tokenizer_path)
        self.shard = sharding.data_shard(trainer.mesh, self.cfg.train.batch_size)  # this process's rows
        self.schedule = SaveSchedule(self.cfg.checkpoint)
        self.saved_step: int | None = None
        self.restores = 0

    def next_batch(self, step: int) -> jax.Array:
        t = self.cfg.train
        rows = self.train_ds.batch(step, t.batch_size, t.seq_len, t.seed, *self.shard)
        return sharding.global_batch(rows, self.trainer.mesh, t.batch_size)

    def evaluate(self, params: Any, step: int, write: bool = True) -> dict[str, float]:
        result = evaluate(self.trainer, params, self.val_ds, self.cfg.train.eval_batches, self.byte_lengths)
        if write:
            self.writer.write({"step": step, **result})
        self.log(f"step {step}: held-out loss {result['eval_loss']:.4f} "
                 f"({result['bits_per_byte']:.3f} bits/byte)")
        return result

    def run(self, state: TrainState, start: int, stop: StopSignals,
            on_step: Callable[[int, TrainState], TrainState | None] | None) -> TrainState:
        t, step = self.cfg.train, start
        if start < t.steps:
            step_fn = compile_step(self.trainer, state, self.next_batch(start), self.log)
        while step < t.steps:
            state, metrics = step_fn(state, self.next_batch(step))
            step += 1
            self.logger.push(step, metrics)
            if on_step is not None:
                state = on_step(step, state) or state
            if len(self.logger.bad_steps) >= t.nonfinite_patience > 0:
                state = self.recover(state)
                step = int(state.step)
                continue
            if step % t.eval_every == 0 and step < t.steps:
                self.evaluate(state.params, step)
            if step < t.steps and self.schedule.due(step):
                self.save(step, state)
            if stop.requested():
                self.stop(step, state, stop)
        return state

    def save(self, step: int, state: TrainState) -> bool:
        self.logger.drain()  # metrics.jsonl holds every row up to `step` before its length is recorded
        metrics = Path(self.cfg.run_dir) / "metrics.jsonl"
        length = metrics.stat().st_size if metrics.is_file() else 0
        meta = {**self.meta, "data_next_step": step, "metrics_bytes": length}
        self.schedule.saved()
        self.saved_step = step
        return self.ckpt.save(step, state, meta, self.tokenizer)

    def stop(self, step: int, state: TrainState, stop: StopSignals) -> None:
        self.log(f"{stop.name}: writing checkpoint {step}, then exiting")
        ok = self.save(step, state) if self.saved_step != step else True
        if self.ckpt.wait() and ok:
            raise Preempted(f"stopped by {stop.name} at step {step}; checkpoint {step} written: run the same "
                            "command to resume", PREEMPTED_EXIT_CODE)
        raise Preempted(f"stopped by {stop.name} at step {step}; its checkpoint could not be written (the "
                        "earlier ones are intact)", 128 + (stop.signum or signal.SIGTERM))

    def recover(self, state: TrainState) -> TrainState:
        """After `nonfinite_patience` skipped steps in a row: back to the newest good checkpoint from before
        them with a lower learning rate (a replay at the same one would likely diverge the same way)."""
        t, bad = self.cfg.train, self.logger.bad_steps
        what = f"the loss or gradients were not finite for {len(bad)} steps in a row ({bad[0]}..{bad[-1]})"
        if t.nonfinite_action == "stop" or self.restores >= MAX_NONFINITE_RESTORES:
            why = ("train.nonfinite_action=stop" if t.nonfinite_action == "stop"
                   else f"{self.restores} restores did not help")
            raise NonFiniteError(f"{what}; stopping ({why}); newest checkpoint: {self.ckpt.latest_step()}")
        restored = self.newest_finite(bad[0] - 1)
        if restored is None:
            raise NonFiniteError(f"{what}; stopping: no checkpoint with finite parameters from before "
                                 f"step {bad[0]}")
        scale = lr_scale(state) * t.nonfinite_lr_factor
        self.restores += 1
        restored = with_lr_scale(restored, scale, self.trainer)
        step = int(restored.step)
        self.writer.write({"step": step, "event": "nonfinite_restore", "bad_steps": [bad[0], bad[-1]],
                           "lr_scale": scale})
        self.log(f"warning: {what}; restored checkpoint {step} with the learning rate x{scale:g}")
        self.logger.reset(step)
        return restored

    def newest_finite(self, max_step: int) -> TrainState | None:
        """The newest checkpoint <= max_step with finite params (parameters poisoned outside the guarded
        update, e.g. by a bit flip, get checkpointed too); the newer ones move to checkpoints.nonfinite/,
        as the replay writes those steps again."""
        self.ckpt.wait()
        abstract = abstract_state(self.trainer)
        while (found := self.ckpt.restore_newest(abstract, max_step=max_step)) is not None:
            step, restored, _ = found
            if all_finite(restored.params):
                self.ckpt.set_aside([s for s in self.ckpt.all_steps() if s > step], "nonfinite")
                return restored
            max_step = step - 1
        return None

    def finish(self, state: TrainState, start: int) -> dict[str, float]:
        self.logger.flush()
        step = int(state.step)
        final = self.evaluate(state.params, step, write=step > start)  # a finished run run again: no new row
        if step not in (self.saved_step, self.ckpt.latest_step()):
            self.save(step, state)
        if not self.ckpt.wait():
            raise checkpoint.CheckpointSaveError(f"the final checkpoint {step} could not be written to "
                                                 f"{self.ckpt.directory}")
        return final


def train(cfg: Config, log: Callable[[str], None] = print,
          on_step: Callable[[int, TrainState], TrainState | None] | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the final summary.

    Raises Preempted after SIGTERM/SIGINT. `on_step(step, state)`, called after every step, may return a
    replacement state (tests use it to report progress or to poison parameters).
    """
    cfg, log = start_up(cfg, log)
    data_dir = data_dir_for(cfg, log)
    train_ds, val_ds = open_datasets(cfg, data_dir)
    trainer, t = build_trainer(cfg), cfg.train
    check_init_tokenizer(cfg, train_ds)
    ckpt = open_checkpointer(cfg, log)
    state, resumed = start_state(trainer, ckpt, log)  # resume=never refuses before run_dir changes
    if resumed is not None:
        check_same_data(resumed, data_dir, train_ds, log)
    run_dir = prepare_run_dir(cfg, data_dir, train_ds)
    truncate_metrics(run_dir, resumed, log)
    start, chip = int(state.step), hardware.detect()
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters | {jax.device_count()} x {chip.name} | "
        f"mesh {dict(trainer.mesh.shape)} | {t.batch_size}x{t.seq_len} tokens per step | run dir {run_dir}")
    writer = MetricsWriter(run_dir, tensorboard=t.tensorboard) if sharding.is_main_process() else Discard()
    logger = StepLogger(cfg, writer, start, chip, log)
    meta = checkpoint_meta(cfg, data_dir, train_ds)
    loop = Loop(trainer, ckpt, writer, logger, (train_ds, val_ds), meta, log)
    try:
        with StopSignals(cfg.checkpoint.grace_s) as stop:
            initial = loop.evaluate(state.params, start) if start == 0 else None
            state = loop.run(state, start, stop, on_step)
            final = loop.finish(state, start)
    finally:
        writer.close()
        ckpt.close()  # waits for a save in flight: an error above must not cost a good checkpoint
    return {"run_dir": str(run_dir), "steps": int(state.step), "n_params": n_params, "params": state.params,
            "initial_eval_loss": initial["eval_loss"] if initial else None, "first_loss": logger.first_loss,
            "final_loss": logger.last_loss, "ledger": logger.ledger(time.perf_counter(), int(state.step)),
            **final}
