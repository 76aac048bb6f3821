"""The train step: the train state, the loss and its gradients, and `build_trainer`, which builds the
jitted, sharded, donated step (and init and eval) for a mesh.

Data flow of one step: a token batch (B, T+1), split over data × fsdp → the loss and gradients,
accumulated over microbatches → the AdamW update, skipped inside the step if anything is not finite →
the new state and the step's metrics (read by the loop one step late).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from anychip.config import Config
from anychip.model.attention import kernel_for
from anychip.model.decoder import forward, hidden_states, unembedding
from anychip.model.loss import chunked_cross_entropy, cross_entropy
from anychip.model.params import init_params, is_norm, param_axes, param_shapes
from anychip.parallel import mesh as sharding
from anychip.train import checkpoint
from anychip.train.optim import learning_rate_schedule, lr_scale, make_optimizer

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
    """The decoder's compute settings for this config on this backend: dtype, remat policy, layer loop,
    attention kernel, documents."""
    c = cfg.compute_for(jax.default_backend())
    compute_dtype = DTYPES[c.dtype]
    # train() sets eot_id from the tokenizer first; callers that only lower the step (check, bench) have no
    # data, and any id gives the same program.
    eot_id = (cfg.train.eot_id or 0) if cfg.train.document_mask else None
    return {"compute_dtype": compute_dtype, "remat": c.remat, "attention_impl": kernel_for(c.attention, compute_dtype),
            "attention_block": c.attention_block, "eot_id": eot_id, "unroll": c.layers == "unroll"}


def loss_fn(params: Any, tokens: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """tokens (B, T+1) → (loss with z-loss, plain cross-entropy)."""
    inputs, targets, z_loss = tokens[:, :-1], tokens[:, 1:], cfg.train.z_loss
    loss_chunk = cfg.compute_for(jax.default_backend()).loss_chunk
    if loss_chunk:
        h = hidden_states(params, inputs, cfg.model, **model_kwargs(cfg))
        return chunked_cross_entropy(h, unembedding(params, cfg.model), targets, chunk=loss_chunk, z_loss=z_loss)
    logits = forward(params, inputs, cfg.model, **model_kwargs(cfg))  # (B, T, V) fp32
    return cross_entropy(logits, targets, z_loss)


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
    """The mesh (default: this config's over every device; an AbstractMesh lowers without devices), the
    optimizer, the state's shardings and the jitted init, train step and eval loss."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    sharding.check_batch(mesh, cfg.train.batch_size, cfg.train.grad_accum)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, is_norm(cfg.model))
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    p_shard = sharding.param_shardings(param_axes(cfg.model), param_shapes(cfg.model), mesh)
    repl = sharding.replicated(mesh)

    def init(key: jax.Array) -> TrainState:
        params = init_params(cfg.model, key, DTYPES[cfg.compute.param_dtype])
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
        lr = schedule(state.step) * lr_scale(state.opt_state)
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
    """ShapeDtypeStructs of the train state with the trainer's shardings: restore and AOT-compile targets."""
    shapes = jax.eval_shape(trainer.init, jax.random.key(0))
    return checkpoint.abstract_like(shapes, trainer.state_shardings)
