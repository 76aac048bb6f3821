"""The training loop: batches in, steps out; the components decide when they run.

Data flow: TokenDataset.batch(seed, step) → global_batch (sharded over the mesh) → the jitted step →
metrics (read one step late, so the host never waits for the device) → the evaluator, the
checkpointer and the non-finite guard, each of which decides for itself whether this step is its turn.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from anychip.config import Config
from anychip.cost import hardware
from anychip.data.dataset import TokenDataset
from anychip.data.mixture import MixtureDataset
from anychip.data.tokenizer import load_tokenizer, token_byte_lengths
from anychip.files import read_text
from anychip.model.params import param_table
from anychip.parallel import mesh as sharding
from anychip.parallel.distributed import enable_compile_cache, initialize_distributed, is_main_process
from anychip.train import memory
from anychip.train.checkpoint import Checkpointer, CheckpointSaveError, checkpoint_meta, tokenizer_json
from anychip.train.data import data_dir_for, open_datasets, with_eot_id
from anychip.train.evaluate import EvalResult, Evaluator
from anychip.train.guard import NonFiniteGuard
from anychip.train.metrics import Discard, MetricsWriter, StepLogger
from anychip.train.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignals
from anychip.train.remote_run import remote_run
from anychip.train.resume import check_init_tokenizer, check_same_data, new_special_tokens, start_state
from anychip.train.run_dir import RunDir
from anychip.train.step import Trainer, TrainState, build_trainer

# Called after every step with (step, state); may return a replacement state (tests: progress, poison).
Callback = Callable[[int, TrainState], "TrainState | None"]


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    steps: int
    n_params: int
    params: Any  # the final parameters, on the devices
    initial_eval: EvalResult | None  # None when the run resumed
    final_eval: EvalResult
    first_loss: float | None  # of the first logged step of this call
    final_loss: float | None
    ledger: dict[str, Any]  # chip-hours and cost of this call (`hardware.cost_summary`)


def start_up(cfg: Config, log: Callable[[str], None]) -> tuple[Config, Callable[[str], None]]:
    """Before any JAX computation: jax.distributed (multi-process runs), the persistent compilation
    cache, then train.auto_fit. Returns the config to run and this process's log: only process 0
    prints, the others would repeat it."""
    initialize_distributed(cfg.distributed, log)
    enable_compile_cache(cfg.compute.compile_cache_dir)
    log = log if is_main_process() else (lambda _message: None)
    return (memory.auto_fit(cfg, jax.device_count(), log) if cfg.train.auto_fit else cfg), log


def compile_step(trainer: Trainer, state: TrainState, batch: jax.Array, log: Callable[[str], None]) -> Callable:
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


class Loop:
    """The steps of one `train` call and the components that act on them."""

    def __init__(self, trainer: Trainer, run: RunDir, ckpt: Checkpointer, datasets: tuple[TokenDataset, TokenDataset],
                 meta: dict[str, Any], start: int, log: Callable[[str], None], callbacks: Sequence[Callback]):
        self.trainer, self.cfg, self.run_dir, self.ckpt, self.log = trainer, trainer.cfg, run, ckpt, log
        (self.train_ds, val_ds), self.meta, self.callbacks = datasets, meta, callbacks
        tensorboard = run.tensorboard if self.cfg.log.tensorboard else None
        self.writer = MetricsWriter(run.metrics, tensorboard) if is_main_process() else Discard()
        self.guard = NonFiniteGuard(trainer, ckpt, self.writer, log)
        self.logger = StepLogger(self.cfg, self.writer, start, hardware.detect(), self.guard.observe)
        byte_lengths = token_byte_lengths(load_tokenizer(self.train_ds.tokenizer_path))
        self.evaluator = Evaluator(trainer, val_ds, byte_lengths, self.writer, log)
        self.tokenizer = tokenizer_json(self.train_ds.tokenizer_path)
        self.shard = sharding.data_shard(trainer.mesh, self.cfg.train.batch_size)  # this process's rows
        self.n_params = sum(math.prod(spec.shape) for spec in param_table(self.cfg.model).values())

    def next_batch(self, step: int) -> jax.Array:
        t = self.cfg.train
        rows = self.train_ds.batch(step, t.batch_size, t.seq_len, t.seed, *self.shard)
        return sharding.global_batch(rows, self.trainer.mesh, t.batch_size)

    def checkpoint_meta(self, step: int) -> Callable[[], dict[str, Any]]:
        def meta() -> dict[str, Any]:
            self.logger.drain()  # metrics.jsonl holds every row up to `step` before its length is recorded
            return {**self.meta, "data_next_step": step, "metrics_bytes": self.run_dir.metrics_bytes()}

        return meta

    def run(self, state: TrainState, start: int, stop: StopSignals) -> TrainState:
        total, step = self.cfg.train.steps, start
        if start < total:
            step_fn = compile_step(self.trainer, state, self.next_batch(start), self.log)
        while step < total:
            state, metrics = step_fn(state, self.next_batch(step))
            step += 1
            self.logger.push(step, metrics)
            for callback in self.callbacks:
                state = callback(step, state) or state
            if self.guard.tripped:
                state = self.guard.recover(state)
                step = int(state.step)
                self.logger.reset(step)
                continue
            self.evaluator.maybe_evaluate(step, state.params)
            if step < total:  # the last step is saved after the final evaluation, in `finish`
                self.ckpt.maybe_save(step, state, self.checkpoint_meta(step), self.tokenizer)
            if stop.requested():
                self.stop(step, state, stop)
        return state

    def stop(self, step: int, state: TrainState, stop: StopSignals) -> None:
        self.log(f"{stop.name}: writing checkpoint {step}, then exiting")
        self.ckpt.maybe_save(step, state, self.checkpoint_meta(step), self.tokenizer, last=True)
        if self.ckpt.wait() and self.ckpt.latest_step() == step:
            raise Preempted(f"stopped by {stop.name} at step {step}; checkpoint {step} written: run the same "
                            "command to resume", PREEMPTED_EXIT_CODE)
        raise Preempted(f"stopped by {stop.name} at step {step}; its checkpoint could not be written (the "
                        "earlier ones are intact)", 128 + (stop.signum or signal.SIGTERM))

    def train(self, state: TrainState) -> tuple[TrainState, EvalResult | None, EvalResult]:
        """(final state, evaluation at step 0 unless resumed, final evaluation)."""
        start = int(state.step)
        self.log(f"model {self.cfg.model.name}: {self.n_params / 1e6:.2f}M parameters | {jax.device_count()} x "
                 f"{hardware.detect().name} | mesh {dict(self.trainer.mesh.shape)} | {self.cfg.train.batch_size}x"
                 f"{self.cfg.train.seq_len} tokens per step | run dir {self.run_dir}")
        try:
            with StopSignals(self.cfg.checkpoint.grace_s) as stop:
                initial = self.evaluator.evaluate(start, state.params) if start == 0 else None
                state = self.run(state, start, stop)
                return state, initial, self.finish(state, start)
        finally:
            self.writer.close()

    def finish(self, state: TrainState, start: int) -> EvalResult:
        self.logger.flush()
        step = int(state.step)
        final = self.evaluator.evaluate(step, state.params, write=step > start)  # a finished run run again
        self.ckpt.maybe_save(step, state, self.checkpoint_meta(step), self.tokenizer, last=True)
        if not self.ckpt.wait():
            raise CheckpointSaveError(f"the final checkpoint {step} could not be written to {self.ckpt.directory}")
        return final


def mixture_meta(train_ds: Any, resumed: dict[str, Any] | None, changed: dict[str, Any] | None) -> dict[str, Any]:
    """What a mixture run's checkpoints add: its components and weights (compared on resume) and the step
    since which these weights apply (realized proportions count from there)."""
    if not isinstance(train_ds, MixtureDataset):
        return {}
    since = 0 if resumed is None else resumed["step"] if changed is not None else resumed.get("mixture_since", 0)
    return {"data_mixture": train_ds.manifest["mixture"], "mixture_since": since}


def train(cfg: Config, log: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run (or resume) training as configured. Raises Preempted after SIGTERM/SIGINT, UserError (one line)
    for bad input, a busy run directory or a storage fault."""
    cfg, log = start_up(cfg, log)
    with remote_run(cfg, log) as (cfg, uploads):  # run_dir in object storage: a mirrored working copy
        return _train(cfg, log, [*callbacks, *uploads])


def _train(cfg: Config, log: Callable[[str], None], callbacks: Sequence[Callback]) -> TrainResult:
    run = RunDir(cfg.run_dir)
    # One trainer per run dir, taken first (a second one is refused at once) and held before the
    # checkpointer opens: opening deletes unfinished saves.
    with run.locked(log) if is_main_process() else contextlib.nullcontext():
        data_dir = data_dir_for(cfg, log)
        train_ds, val_ds = open_datasets(cfg, data_dir)
        cfg = with_eot_id(cfg, train_ds)
        trainer = build_trainer(cfg)
        check_init_tokenizer(cfg, train_ds)
        ckpt = run.checkpointer(cfg.checkpoint, log)
        try:
            state, resumed = start_state(trainer, run, ckpt, log)  # resume=never refuses before run_dir changes
            ckpt.check_storage(state)  # a read-only or full disk shows now, not at the first save
            changed = None if resumed is None else check_same_data(resumed, data_dir, train_ds, log)
            if is_main_process():  # one writer per run; the other processes only read
                if resumed is None:
                    run.set_aside_history(log)
                run.write_files(cfg, read_text(train_ds.tokenizer_path), train_ds.manifest_text,
                                special_tokens=new_special_tokens(cfg, run, train_ds))
                run.truncate_metrics(None if resumed is None else resumed.get("metrics_bytes"), log)
            meta = checkpoint_meta(cfg, train_ds.manifest["tokenizer_sha256"], train_ds.manifest_sha256,
                                   **mixture_meta(train_ds, resumed, changed))
            loop = Loop(trainer, run, ckpt, (train_ds, val_ds), meta, int(state.step), log, callbacks)
            if changed is not None:
                loop.writer.write(changed)
            state, initial, final = loop.train(state)
            if isinstance(train_ds, MixtureDataset):
                since = meta["mixture_since"]
                shares = train_ds.realized(int(state.step), cfg.train.batch_size, cfg.train.seed, start=since)
                log(f"mixture realized (steps {since}..{int(state.step)}): "
                    + ", ".join(f"{p} {share:.3f}" for p, share in shares.items()))
        finally:
            ckpt.close()  # waits for a save in flight: an error above must not cost a good checkpoint
    logger = loop.logger
    return TrainResult(str(run), int(state.step), loop.n_params, state.params, initial, final, logger.first_loss,
                       logger.last_loss, logger.ledger(time.perf_counter(), int(state.step)))
