"""Checkpoints: bitwise round trips, retention, complete-or-invisible, damage, failed saves, resume
rules and the non-finite guard. The killed-process tests are in test_fault_tolerance.py."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anychip.config import load_config
from anychip.errors import UserError
from anychip.train import checkpoint
from anychip.train.checkpoint import Checkpointer, CheckpointSaveError, SaveSchedule
from anychip.train.guard import NonFiniteError
from anychip.train.loop import train
from anychip.train.run_dir import RunDir, load_run
from anychip.train.step import build_trainer

# A very small model: these tests are about the plumbing around it, and each compile costs seconds.
MICRO = ["model=tiny", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
         "model.d_ff=64", "train.batch_size=4", "train.seq_len=32", "log.every=1",
         "eval.every=1000", "eval.batches=1", "eval.sample_tokens=0",
         "compute.dtype=float32", "optim.warmup_steps=2"]


def state_tree() -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"step": jnp.int32(7), "params": {"w": jax.random.normal(k1, (64, 48)),
                                             "b": jax.random.normal(k2, (48,)).astype(jnp.bfloat16)}}


def abstract(tree: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def bits(tree: dict) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def data_files(step_dir: Path) -> list[Path]:
    return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt.process" in str(p)),
                  key=lambda p: p.stat().st_size)


def test_round_trip_is_bitwise_with_meta_and_tokenizer(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    tree = state_tree()
    ckpt.save(7, tree, {"data_seed": 3}, tokenizer={"model": {"type": "BPE"}})
    assert ckpt.wait()
    restored, meta = ckpt.restore(7, abstract(tree))
    assert bits(restored) == bits(tree)
    assert meta["step"] == 7 and meta["data_seed"] == 3
    assert meta["arrays"]["params.w"]["shape"] == [64, 48]
    assert meta["arrays"]["params.b"]["dtype"] == "bfloat16"
    assert ckpt.read_tokenizer(7) == {"model": {"type": "BPE"}}
    ckpt.close()


def test_retention_keeps_the_last_k_and_every_m(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", keep=2, keep_every=4)
    for step in range(1, 11):
        ckpt.save(step, state_tree(), {})
    ckpt.close()
    assert Checkpointer(tmp_path / "c").all_steps() == [4, 8, 9, 10]


def test_a_half_written_checkpoint_is_invisible_and_cleaned_up(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(1, state_tree(), {})
    ckpt.close()
    # What a process killed in the middle of a save leaves behind: a temporary step directory.
    partial = tmp_path / "c" / "2.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half-written").write_bytes(b"\0" * 100)
    ckpt = Checkpointer(tmp_path / "c")
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    ckpt.save(2, state_tree(), {})  # orbax finishes deleting leftovers (in the background) before a save
    ckpt.close()
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "c" / "2" / "state" / "half-written").exists()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    ckpt, logs = Checkpointer(tmp_path / "c", log=lambda m: logs.append(m)), []
    first = state_tree()
    ckpt.save(1, first, {})
    ckpt.save(2, jax.tree.map(lambda x: x + 1, first), {})
    ckpt.wait()
    target = data_files(tmp_path / "c" / "2")[-1]  # the largest file holds the array data
    size = target.stat().st_size
    if damage == "truncate":
        os.truncate(target, size // 2)
    else:  # tensorstore would restore this silently; the fingerprint notices
        with open(target, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0x10]))
    step, restored, _ = ckpt.restore_newest(abstract(first))
    assert step == 1 and bits(restored) == bits(first)
    assert any("checkpoint 2 is unusable" in m and "using checkpoint 1" in m for m in logs)
    assert ckpt.all_steps() == [1] and (tmp_path / "c.corrupt" / "2").is_dir()  # moved aside, not deleted
    ckpt.close()


def test_when_no_checkpoint_restores_the_error_is_one_line_and_nothing_moves(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(1, state_tree(), {})
    ckpt.wait()
    for f in data_files(tmp_path / "c" / "1"):
        os.truncate(f, 0)
    with pytest.raises(UserError, match=r"no checkpoint in .* restores: step 1") as e:
        ckpt.restore_newest(abstract(state_tree()))
    assert "\n" not in str(e.value) and ckpt.all_steps() == [1]
    ckpt.close()


def test_a_different_shape_names_the_array_and_both_shapes(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(1, state_tree(), {})
    ckpt.wait()
    wrong = abstract(state_tree())
    wrong["params"]["w"] = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=wrong["params"]["w"].sharding)
    with pytest.raises(UserError, match=r"'params\.w' is float32\[64, 48\] in the checkpoint but "
                                        r"float32\[64, 32\]"):
        ckpt.restore(1, wrong)
    ckpt.close()


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes beyond `limit` bytes fail with EFBIG, like a full disk. Unlike chmod, this stops root too."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


# Orbax's writer threads leave asyncio exceptions behind after a failed write; harmless.
NOISY_FAILURE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@NOISY_FAILURE
@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_failed_save_leaves_the_earlier_checkpoints_intact(tmp_path, policy):
    logs: list[str] = []
    ckpt = Checkpointer(tmp_path / "c", on_save_error=policy, log=logs.append)
    tree = state_tree()
    ckpt.save(1, tree, {})
    ckpt.wait()
    with file_size_limit(1000):  # smaller than the array data
        ckpt.save(2, tree, {})
        if policy == "stop":
            with pytest.raises(CheckpointSaveError,
                               match=r"could not write checkpoint 2 .*\(newest complete: 1\)"):
                ckpt.wait()
        else:
            assert not ckpt.wait() and "could not write checkpoint 2" in logs[-1]
    assert ckpt.all_steps() == [1] and bits(ckpt.restore(1, abstract(tree))[0]) == bits(tree)
    ckpt.save(3, tree, {})  # and the next save works again
    assert ckpt.close() and ckpt.all_steps() == [1, 3]


# ---------------------------------------------------------------------------------------------
# Through the train loop


@pytest.fixture
def run(small_corpus, tmp_path_factory, tmp_path):
    cache = tmp_path_factory.getbasetemp() / "xla_cache_checkpoint_tests"

    def run(*overrides: str, on_step=None, log=None):
        cfg = load_config(None, [*MICRO, f"data.path={small_corpus}", f"run_dir={tmp_path / 'run'}",
                                 f"compute.compile_cache_dir={cache}", *overrides])
        return train(cfg, log=log or (lambda _: None), callbacks=[on_step] if on_step else [])

    return run


def snapshot(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def test_resume_never_refuses_without_touching_the_run(run, tmp_path):
    run("train.steps=2")
    before = snapshot(tmp_path / "run")
    with pytest.raises(UserError, match=r"checkpoint\.resume=never; choose a new run_dir") as e:
        run("train.steps=4", "checkpoint.resume=never")
    assert "\n" not in str(e.value) and snapshot(tmp_path / "run") == before
    with pytest.raises(UserError, match=r"'params\.embed' is float32\[512, 32\] in the checkpoint but "
                                        r"float32\[512, 64\] here"):
        run("train.steps=4", "model.d_model=64", "model.n_heads=4")
    # The checkpoint carries its tokenizer: the run's loader needs no tokenizer.json beside it.
    (tmp_path / "run" / "tokenizer.json").unlink()
    assert load_run(tmp_path / "run")[2].get_vocab_size() == 512


@NOISY_FAILURE
@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_the_loop_stops_or_goes_on_after_a_failed_save(run, tmp_path, policy):
    def fill_disk(step, state):  # checkpoint 4 cannot be written; from step 6 on the disk has room
        if step == 3:
            stack.enter_context(file_size_limit(50_000))  # metrics.jsonl fits, the arrays do not
        elif step == 6:
            stack.close()

    with contextlib.ExitStack() as stack:
        # Synchronous saves, so that the limit hits checkpoint 4 and not a late write of 2 (the
        # Checkpointer test above covers a failure surfacing from a background write).
        overrides = ["train.steps=8", "checkpoint.every_steps=2", "checkpoint.keep=10",
                     "checkpoint.async_save=false", f"checkpoint.on_save_error={policy}",
                     "model.vocab_size=2048"]
        if policy == "stop":
            with pytest.raises(CheckpointSaveError, match="could not write checkpoint 4"):
                run(*overrides, on_step=fill_disk)
            assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2]
            return
        logs: list[str] = []
        run(*overrides, on_step=fill_disk, log=logs.append)
    assert any("could not write checkpoint 4" in m and "training goes on" in m for m in logs)
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2, 6, 8]


def test_a_nonfinite_step_is_skipped_bit_for_bit(small_corpus):
    cfg = load_config(None, [*MICRO, f"data.path={small_corpus}"])
    trainer = build_trainer(cfg)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 33)), jnp.int32)
    state = trainer.init(jax.random.key(0))
    initial = bits(state.params)
    nan_norm = state.params["final_norm"].at[0].set(jnp.nan)
    poisoned = state._replace(params={**state.params, "final_norm": nan_norm})
    before = bits(poisoned)
    after, metrics = trainer.step(poisoned, batch)  # donates `poisoned` (and arrays it shares with `state`)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 1 and bits(after)[1:] == before[1:]  # all but the step counter: unchanged
    fine, metrics = trainer.step(trainer.init(jax.random.key(0)), batch)
    assert float(metrics["skipped"]) == 0.0 and bits(fine.params) != initial


def poison_after(step_to_poison: int, times: int = 1):
    """A callback that makes every parameter NaN after step `step_to_poison`, the first `times` times
    the run gets there: every later step sees NaN parameters, as after a bit flip."""
    hits = []

    def on_step(step, state):
        if step == step_to_poison and len(hits) < times:
            hits.append(step)
            return state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return None

    return on_step


def test_nonfinite_steps_in_a_row_restore_the_last_good_checkpoint(run, tmp_path):
    logs: list[str] = []
    result = run("train.steps=10", "checkpoint.every_steps=2", "nonfinite.patience=2",
                 on_step=poison_after(5), log=logs.append)
    rows = RunDir(tmp_path / "run").read_metrics()
    assert [r["step"] for r in rows if r.get("skipped")] == [6, 7]
    event = next(r for r in rows if r.get("event") == "nonfinite_restore")
    # Checkpoint 6 holds the poisoned params (saved before step 6 showed NaN): 4 is the last good one.
    assert event["step"] == 4 and event["bad_steps"] == [6, 7] and event["lr_scale"] == 0.5
    assert (tmp_path / "run" / "checkpoints.nonfinite" / "6").is_dir()
    assert any("restored checkpoint 4 with the learning rate x0.5" in m for m in logs)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(result.params))
    replayed = [r for r in rows if r["step"] == 5 and "loss" in r]
    assert len(replayed) == 2 and replayed[1]["lr"] == pytest.approx(replayed[0]["lr"] / 2, rel=1e-6)


def test_nonfinite_steps_in_a_row_stop_when_configured_or_when_restores_do_not_help(run, tmp_path):
    with pytest.raises(NonFiniteError, match=r"not finite for 2 steps in a row \(6\.\.7\); stopping "
                                             r"\(nonfinite\.action=stop\)"):
        run("train.steps=10", "checkpoint.every_steps=2", "nonfinite.patience=2",
            "nonfinite.action=stop", on_step=poison_after(5))
    with pytest.raises(NonFiniteError, match=r"stopping \(3 restores did not help\)"):
        run("train.steps=10", "checkpoint.every_steps=2", "nonfinite.patience=2",
            f"run_dir={tmp_path / 'again'}", on_step=poison_after(5, times=99))


def test_fingerprints_see_a_moved_value(tmp_path):
    tree = {"a": jnp.arange(6, dtype=jnp.float32)}
    swapped = {"a": jnp.asarray([1, 0, 2, 3, 4, 5], jnp.float32)}  # same sum, different place
    assert not np.array_equal(checkpoint.fingerprint_array(tree), checkpoint.fingerprint_array(swapped))


def test_time_based_checkpoints(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("anychip.train.checkpoint.time.monotonic", lambda: now[0])
    schedule = SaveSchedule(every_steps=100, every_minutes=2)
    assert schedule.due(100) and not schedule.due(7)
    now[0] += 119
    assert not schedule.due(7)
    now[0] += 1
    assert schedule.due(7)
    schedule.saved()
    assert not schedule.due(8)
