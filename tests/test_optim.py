"""The optimizer's schedule shapes and weight-decay mask."""

import itertools

import jax.numpy as jnp
import optax
import pytest

from anychip.config import OptimConfig
from anychip.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


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


def test_norm_gains_are_not_decayed():
    params = {"embed": jnp.ones((4, 2)), "final_norm": jnp.ones(2),
              "layers": {"attn_norm": jnp.ones((1, 2)), "wq": jnp.ones((1, 2, 1, 2))}}
    mask = weight_decay_mask(params)
    assert mask == {"embed": True, "final_norm": False, "layers": {"attn_norm": False, "wq": True}}
    opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant"), 10)
    zero_grads = {k: v * 0 for k, v in params.items() if k != "layers"} | {
        "layers": {k: v * 0 for k, v in params["layers"].items()}}
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["final_norm"][0]) == 1.0  # untouched
    assert float(new["embed"][0, 0]) == pytest.approx(1.0 - 0.1 * 0.5)  # decoupled decay: p -= lr·wd·p
