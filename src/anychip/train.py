"""The train state, the jitted train step, and the loop around it.

Data flow: TokenDataset.batch(step) → global_batch (sharded over the mesh) → train_step → metrics
(read one step late, so the host never waits on the device) and, every N steps, eval and a
checkpoint.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from anychip import __version__, checkpoint, hardware, sharding
from anychip.config import Config, load_config, replace, save_config, to_dict
from anychip.data import TokenDataset, builtin_corpus
from anychip.errors import UserError
from anychip.kernels.attention import resolve as resolve_attention
from anychip.metrics import MetricsWriter, Progress, flops_per_token, mfu
from anychip.model import cross_entropy, forward, init_params, param_axes, param_shapes
from anychip.optim import learning_rate_schedule, make_optimizer
from anychip.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


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
    logits = forward(params, tokens[:, :-1], cfg.model, **model_kwargs(cfg))  # (B, T, V) fp32
    return cross_entropy(logits, tokens[:, 1:], cfg.train.z_loss)


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
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
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
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
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
    for rows in ds.eval_batches(cfg.batch_size, cfg.seq_len, max_batches, jax.process_index(), jax.process_count()):
        batch = sharding.global_batch(rows, trainer.mesh, rows.shape[0] * jax.process_count())
        n = batch.shape[0] * cfg.seq_len
        nats += float(trainer.eval_loss(params, batch)) * n
        tokens += n
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[rows[:, 1:]].sum()) * jax.process_count()
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
    cfg = load_config(run_dir / "config.yaml")
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{run_dir} has no checkpoint")
    trainer = build_trainer(cfg)
    state, _ = ckpt.restore(step, abstract_state(trainer))
    ckpt.close()
    return cfg, state.params, load_tokenizer(run_dir / "tokenizer.json")


def start_state(trainer: Trainer, ckpt: checkpoint.Checkpointer, log: Callable[[str], None]) -> TrainState:
    """Resume from the newest checkpoint in the run, else load `init_from` params, else initialise."""
    cfg = trainer.cfg
    latest = ckpt.latest_step()
    if latest is not None:
        state, _ = ckpt.restore(latest, abstract_state(trainer))
        log(f"resumed from {ckpt.directory}/{latest}")
        return state
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
    return state


def prepare_run_dir(cfg: Config, data_dir: Path, train_ds: TokenDataset) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    shutil.copyfile(train_ds.tokenizer_path, run_dir / "tokenizer.json")
    shutil.copyfile(data_dir / "manifest.json", run_dir / "data_manifest.json")
    return run_dir


def checkpoint_meta(cfg: Config, train_ds: TokenDataset) -> dict[str, Any]:
    return {
        "config": to_dict(cfg), "data_seed": cfg.train.seed, "anychip_version": __version__,
        "tokenizer_sha256": train_ds.manifest["tokenizer_sha256"],
    }


class StepLogger:
    """Turns step metrics into metrics.jsonl rows and progress lines, one step late.

    `jax` dispatches a step asynchronously; reading its metrics forces a host-device sync. Reading
    step s-1's metrics right after dispatching step s costs nothing: step s-1 is already done.
    """

    def __init__(self, cfg: Config, writer: MetricsWriter, start: int, chip: hardware.Chip):
        self.cfg, self.writer, self.chip = cfg, writer, chip
        self.progress = Progress(cfg.train.steps, start)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.pending: tuple[int, dict[str, jax.Array]] | None = None
        self.last_time, self.last_step = time.perf_counter(), start
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def push(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Record that `step` was dispatched; log the previously pushed step if it is due."""
        if self.pending is not None:
            self._log(*self.pending)
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is not None:
            self._log(*self.pending, force=True)
        self.pending = None

    def _log(self, step: int, metrics: dict[str, jax.Array], force: bool = False) -> None:
        if not (force or step % self.cfg.train.log_every == 0 or step == self.last_step + 1 == 1):
            return
        record: dict[str, Any] = {"step": step, **{k: float(v) for k, v in metrics.items()}}  # waits for step
        now = time.perf_counter()
        record["tokens"] = step * self.tokens_per_step
        record["tokens_per_s"] = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        record["mfu"] = mfu(record["tokens_per_s"], self.flops_per_token, self.chip.peak_bf16_flops,
                            jax.device_count())
        self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = record["loss"]
        self.writer.write(record)
        self.progress.update(record)
        self.last_time, self.last_step = now, step


def train(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the final summary."""
    data_dir = data_dir_for(cfg, log)
    train_ds, val_ds = open_datasets(cfg, data_dir)
    run_dir = prepare_run_dir(cfg, data_dir, train_ds)
    trainer, t = build_trainer(cfg), cfg.train
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints")
    state = start_state(trainer, ckpt, log)
    start, chip = int(state.step), hardware.detect()
    byte_lengths = token_byte_lengths(load_tokenizer(train_ds.tokenizer_path))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters | {jax.device_count()} x {chip.name} | "
        f"mesh {dict(trainer.mesh.shape)} | {t.batch_size}x{t.seq_len} tokens per step | run dir {run_dir}")
    writer = MetricsWriter(run_dir, tensorboard=t.tensorboard)

    def next_batch(step: int) -> jax.Array:
        rows = train_ds.batch(step, t.batch_size, t.seq_len, t.seed, jax.process_index(), jax.process_count())
        return sharding.global_batch(rows, trainer.mesh, t.batch_size)

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(trainer, state.params, val_ds, t.eval_batches, byte_lengths)
        writer.write({"step": step, **result})
        log(f"step {step}: held-out loss {result['eval_loss']:.4f} ({result['bits_per_byte']:.3f} bits/byte)")
        return result

    initial = run_eval(start) if start == 0 else None
    if start < t.steps:
        t0 = time.perf_counter()
        step_fn = trainer.step.lower(state, next_batch(start)).compile()
        log(f"compiled the train step in {time.perf_counter() - t0:.1f}s")
    logger = StepLogger(cfg, writer, start, chip)
    for step in range(start, t.steps):
        state, metrics = step_fn(state, next_batch(step))
        logger.push(step + 1, metrics)
        if (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
            run_eval(step + 1)
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
            ckpt.save(step + 1, state, checkpoint_meta(cfg, train_ds))
    logger.flush()
    final = run_eval(int(state.step))
    if ckpt.latest_step() != int(state.step):
        ckpt.save(int(state.step), state, checkpoint_meta(cfg, train_ds))
    ckpt.close()
    writer.close()
    return {"run_dir": str(run_dir), "steps": int(state.step), "n_params": n_params, "params": state.params,
            "initial_eval_loss": initial["eval_loss"] if initial else None, "first_loss": logger.first_loss,
            "final_loss": logger.last_loss, **final}
