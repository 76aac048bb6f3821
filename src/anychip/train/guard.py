"""The non-finite guard, outside the step: counts the steps the step itself skipped (a NaN/Inf loss or
gradient changes nothing, see `step.py`) and, after `nonfinite.patience` in a row, goes back to the
newest good checkpoint with a lower learning rate, or stops the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from anychip.errors import UserError
from anychip.train.checkpoint import Checkpointer
from anychip.train.metrics import Discard, MetricsWriter
from anychip.train.optim import lr_scale, with_lr_scale
from anychip.train.step import Trainer, TrainState, abstract_state

MAX_RESTORES = 3  # per process: a run that keeps diverging after this many restores stops


class NonFiniteError(UserError):
    """The loss or gradients stayed NaN/Inf for nonfinite.patience steps and no restore was possible."""


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class NonFiniteGuard:
    def __init__(self, trainer: Trainer, ckpt: Checkpointer, writer: MetricsWriter | Discard,
                 log: Callable[[str], None]):
        self.trainer, self.ckpt, self.writer, self.log = trainer, ckpt, writer, log
        self.cfg = trainer.cfg.nonfinite
        self.bad_steps: list[int] = []  # the current run of consecutive skipped steps
        self.restores = 0

    def observe(self, step: int, skipped: bool) -> None:
        """Every finished step, in order (the step logger reads each one's flag one step late)."""
        self.bad_steps = [*self.bad_steps, step] if skipped else []
        if skipped:
            self.log(f"warning: step {step}: the loss or a gradient is not finite; update skipped")

    @property
    def tripped(self) -> bool:
        return len(self.bad_steps) >= self.cfg.patience > 0

    def recover(self, state: TrainState) -> TrainState:
        """Back to the newest good checkpoint from before the bad steps, with the learning rate times
        nonfinite.lr_factor (a replay at the same one would likely diverge the same way)."""
        bad = self.bad_steps
        what = f"the loss or gradients were not finite for {len(bad)} steps in a row ({bad[0]}..{bad[-1]})"
        if self.cfg.action == "stop" or self.restores >= MAX_RESTORES:
            why = "nonfinite.action=stop" if self.cfg.action == "stop" else f"{self.restores} restores did not help"
            raise NonFiniteError(f"{what}; stopping ({why}); newest checkpoint: {self.ckpt.latest_step()}")
        restored = self._newest_finite(bad[0] - 1)
        if restored is None:
            raise NonFiniteError(f"{what}; stopping: no checkpoint with finite parameters from before "
                                 f"step {bad[0]}")
        scale = float(lr_scale(state.opt_state)) * self.cfg.lr_factor
        self.restores += 1
        where = lr_scale(self.trainer.state_shardings.opt_state)  # the scale's sharding
        opt_state = with_lr_scale(restored.opt_state, jax.device_put(jnp.float32(scale), where))
        restored = restored._replace(opt_state=opt_state)
        step = int(restored.step)
        self.writer.write({"step": step, "event": "nonfinite_restore", "bad_steps": [bad[0], bad[-1]],
                           "lr_scale": scale})
        self.log(f"warning: {what}; restored checkpoint {step} with the learning rate x{scale:g}")
        self.bad_steps = []
        return restored

    def _newest_finite(self, max_step: int) -> TrainState | None:
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
