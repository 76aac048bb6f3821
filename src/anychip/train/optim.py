"""The optimizer: AdamW with a warmup + cosine / WSD / constant schedule, clipping, a decay mask, and a
learning-rate multiplier held in the optimizer state (lowered by the non-finite guard)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from anychip.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine to `lr·min_lr_ratio`, or hold then decay (WSD), or hold."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    floor = cfg.lr * cfg.min_lr_ratio
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        # Warmup-stable-decay (MiniCPM): constant, then a linear cool-down over the last decay_fraction.
        decay = max(int(rest * cfg.decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, decay)], [rest - decay]
        )
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return after
    # Start warmup at lr/warmup rather than 0 so the first step is not wasted.
    return optax.join_schedules([optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup), after], [warmup])


class LrScaleState(NamedTuple):
    scale: jax.Array  # () float32: learning-rate multiplier, lowered by the non-finite guard


def scale_learning_rate() -> optax.GradientTransformation:
    """Multiply the updates by a factor held in the optimizer state, so that it is checkpointed and a
    resumed run uses the same one. AdamW's update (weight decay included) is proportional to the
    learning rate, so this scales the learning rate; at 1.0 it changes no bit."""

    def update(updates: Any, state: LrScaleState, params: Any = None) -> tuple[Any, LrScaleState]:
        return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: LrScaleState(jnp.ones((), jnp.float32)), update)


def _is_scale(x: Any) -> bool:
    return isinstance(x, LrScaleState)


def lr_scale(opt_state: Any) -> jax.Array:
    """The learning-rate multiplier inside an optimizer state made by `make_optimizer`."""
    (found,) = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_scale) if _is_scale(x)]
    return found.scale


def with_lr_scale(opt_state: Any, scale: jax.Array) -> Any:
    """`opt_state` with its learning-rate multiplier replaced by `scale`."""
    return jax.tree.map(lambda x: LrScaleState(scale) if _is_scale(x) else x, opt_state, is_leaf=_is_scale)


def make_optimizer(cfg: OptimConfig, total_steps: int, is_norm: Any) -> optax.GradientTransformation:
    """AdamW (no weight decay where the `is_norm` tree of the parameters is True), clipping, the lr scale."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=jax.tree.map(lambda norm: not norm, is_norm),
    )
    update = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw
    return optax.chain(update, scale_learning_rate())
