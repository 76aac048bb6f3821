"""The optimizer's schedule shapes and weight-decay mask."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anychip.config import MODEL_PRESETS, OptimConfig
from anychip.model.params import init_params, is_norm, named_leaves
from anychip.train.optim import learning_rate_schedule, lr_scale, make_optimizer, with_lr_scale


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_then_decay_to_the_floor(schedule):
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule=schedule, decay_fraction=0.25)
    lr = [float(learning_rate_schedule(cfg, 110)(s)) for s in range(111)]
    # Warmup is linear from lr/warmup at step 0 to lr at step `warmup` (fp32: 1e-6 absolute).
    assert lr[0] == pytest.approx(0.1, abs=1e-6) and lr[5] == pytest.approx(0.55, abs=1e-6)
    assert lr[10] == pytest.approx(1.0, abs=1e-6)
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(lr[:11]))  # warmup rises
    end = {"cosine": 0.1, "wsd": 0.1, "constant": 1.0}[schedule]
    assert lr[110] == pytest.approx(end, abs=1e-6)
    if schedule == "wsd":  # stable until the last 25% of the 100 post-warmup steps, then linear
        assert lr[84] == pytest.approx(1.0, abs=1e-6) and lr[85 + 12] == pytest.approx(1.0 - 0.9 * 12 / 25, abs=1e-6)
    if schedule == "cosine":  # halfway through the decay the cosine is at the midpoint
        assert lr[60] == pytest.approx(0.55, abs=1e-6)


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_norm_gains_are_not_decayed():
    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], qk_norm=True)
    params = init_params(cfg, jax.random.key(0))
    opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant"), 10,
                         is_norm(cfg))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in ("final_norm", "layers.attn_norm", "layers.q_norm"):  # gains: untouched
        np.testing.assert_array_equal(named_leaves(new)[name], named_leaves(params)[name])
    for name in ("embed", "layers.wq", "layers.w_down"):  # decoupled decay: p -= lr·wd·p
        np.testing.assert_allclose(named_leaves(new)[name], 0.95 * named_leaves(params)[name], rtol=1e-6)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_the_learning_rate_scale_is_found_by_type_and_scales_the_update(grad_clip):
    cfg = MODEL_PRESETS["tiny"]
    params = init_params(cfg, jax.random.key(0))
    opt = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", grad_clip=grad_clip), 10,
                         is_norm(cfg))
    state = opt.init(params)
    assert float(lr_scale(state)) == 1.0
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    full, _ = opt.update(grads, state, params)
    half, _ = opt.update(grads, with_lr_scale(state, jnp.float32(0.5)), params)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(half)):
        np.testing.assert_allclose(b, 0.5 * a, rtol=1e-6)
