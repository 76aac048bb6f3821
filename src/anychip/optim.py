"""The optimizer: AdamW with a warmup + cosine / WSD / constant schedule, clipping and a decay mask."""

from __future__ import annotations

from typing import Any

import jax
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


def weight_decay_mask(params: Any) -> Any:
    """Decay matrices only: norms' gains (1-D per layer) stay out, as in GPT-2/Llama recipes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in jax.tree_util.keystr(path), params
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=weight_decay_mask,
    )
    if cfg.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
