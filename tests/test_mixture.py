"""data.mixture: weights validated before any work; the batch of a step is a pure function of (seed, step,
mixture), independent of the process count; realized proportions follow the weights; a run resumed on
another device count continues the same data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from anychip.data.mixture import MixtureDataset, parse_mixture
from anychip.data.prepare import prepare
from anychip.errors import UserError


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory):
    """Two data dirs with one tokenizer: letters a-m and letters n-z, so a row tells its component."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    dirs = []
    for name, letters in (("first", "abcdefghijklm"), ("second", "nopqrstuvwxyz")):
        src = root / f"{name}_src"
        src.mkdir()
        for i in range(20):
            words = ["".join(rng.choice(list(letters), size=5)) for _ in range(60)]
            (src / f"{i}.txt").write_text(" ".join(words))
        dirs.append(src)
    prepare([str(d) for d in dirs], root / "both", vocab_size=300, log=lambda _: None)
    tok = str(root / "both" / "tokenizer.json")
    out = []
    for src in dirs:
        prepare([str(src)], root / src.name.replace("_src", ""), tokenizer=tok, val_fraction=0.2, log=lambda _: None)
        out.append(str(root / src.name.replace("_src", "")))
    return out


@pytest.mark.parametrize("spec, message", [
    ("[{path: a, weight: 0}]", "must be a positive number"),
    ("[{path: a, weight: -1}]", "must be a positive number"),
    ("[{path: a, weight: heavy}]", "must be a positive number"),
    ("[{path: a}]", "exactly a path and a weight"),
    ("[]", "non-empty list"),
    ("[{path: a, weight: 1}", "not YAML"),
])
def test_bad_mixtures_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_mixture(spec)


def test_mixture_file_and_normalized_weights(tmp_path):
    (tmp_path / "mix.yaml").write_text("- {path: a, weight: 3}\n- {path: b, weight: 1}\n")
    assert parse_mixture(str(tmp_path / "mix.yaml")) == [{"path": "a", "weight": 0.75}, {"path": "b", "weight": 0.25}]


def test_batches_are_pure_process_independent_and_follow_the_weights(two_dirs):
    entries = [{"path": two_dirs[0], "weight": 0.75}, {"path": two_dirs[1], "weight": 0.25}]
    mix, again = MixtureDataset(entries), MixtureDataset(entries)
    first_ids = set(np.unique(np.concatenate([mix.components[0].rows(np.arange(200), 16, 0)])))
    for step in (0, 3, 50):
        whole = mix.batch(step, 16, 16, seed=1)
        assert np.array_equal(whole, again.batch(step, 16, 16, seed=1))
        halves = [mix.batch(step, 16, 16, 1, p, 2) for p in range(2)]
        assert np.array_equal(np.concatenate(halves), whole)
        for row, c in zip(whole, mix.choices(step, 16, seed=1)):
            assert (set(row.tolist()) <= first_ids) == (c == 0) or c == 1
    assert not np.array_equal(mix.batch(0, 16, 16, seed=1), mix.batch(0, 16, 16, seed=2))
    shares = mix.realized(200, 16, seed=1)
    # 3,200 draws: the share's standard deviation is sqrt(.75 × .25 / 3200) = 0.008; 0.04 is 5 of them.
    assert abs(shares[two_dirs[0]] - 0.75) < 0.04 and abs(sum(shares.values()) - 1) < 1e-12
    assert mix.manifest_sha256 != MixtureDataset([{**entries[0], "weight": 0.5}, {**entries[1], "weight": 0.5}]
                                                 ).manifest_sha256


def anychip_train(args, devices, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    r = subprocess.run([sys.executable, "-m", "anychip.cli", "train", *args], check=False, capture_output=True,
                       text=True, env=env, cwd=cwd, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_mixture_run_resumed_on_eight_devices_continues_the_same_data(two_dirs, tmp_path):
    """6 steps straight on 1 device vs 3 steps on 1 device then resumed on 8 (mesh data=8): the same
    batches, so the losses agree within float reassociation (the 8-way gradient mean sums in another
    order: 1e-4 relative is far above that, far below what a different batch would change)."""
    mix = json.dumps([{"path": two_dirs[0], "weight": 0.6}, {"path": two_dirs[1], "weight": 0.4}])
    base = ["model=tiny", "model.vocab_size=300", "train.batch_size=8", "train.seq_len=16", "log.every=1",
            "eval.every=100", "eval.batches=1", "eval.sample_tokens=0", f"data.mixture={mix}",
            "checkpoint.every_steps=3", "optim.schedule=constant", "optim.warmup_steps=0"]  # lr independent of train.steps
    straight = anychip_train([*base, "train.steps=6", "run_dir=straight"], 1, tmp_path)
    anychip_train([*base, "train.steps=3", "run_dir=split"], 1, tmp_path)
    resumed = anychip_train([*base, "train.steps=6", "run_dir=split", "mesh.data=8", "mesh.fsdp=1"], 8, tmp_path)
    assert "mixture realized" in resumed.stdout + resumed.stderr and straight.returncode == 0

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    a, b = losses("straight"), losses("split")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-4)


def test_resume_with_new_weights_warns_records_the_event_and_reads_the_new_mixture(two_dirs, tmp_path):
    """2 steps at 0.8/0.2, resumed to 4 at 0.2/0.8: a warning, a mixture_changed row with both weightings,
    and the loss logged at step 3 is the loss of the new mixture's batch 2 under checkpoint 2's params."""
    import jax

    from anychip.config import load_config
    from anychip.train.loop import train
    from anychip.train.run_dir import RunDir, load_run
    from anychip.train.step import build_trainer

    old = [{"path": two_dirs[0], "weight": 0.8}, {"path": two_dirs[1], "weight": 0.2}]
    new = [{"path": two_dirs[0], "weight": 0.2}, {"path": two_dirs[1], "weight": 0.8}]
    base = ["model=tiny", "model.vocab_size=300", "train.batch_size=8", "train.seq_len=16", "log.every=1",
            "eval.every=100", "eval.batches=1", "eval.sample_tokens=0", "checkpoint.every_steps=2",
            f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    train(load_config(None, [*base, f"data.mixture={json.dumps(old)}", "train.steps=2"]), log=lambda _: None)
    logs: list[str] = []
    train(load_config(None, [*base, f"data.mixture={json.dumps(new)}", "train.steps=4"]), log=logs.append)
    assert any(line.startswith("warning: data.mixture changed since checkpoint 2") for line in logs), logs
    assert any(line.startswith("mixture realized (steps 2..4)") for line in logs), logs
    rows = RunDir(tmp_path / "run").read_metrics()
    events = [r for r in rows if r.get("event") == "mixture_changed"]
    assert events == [{"step": 2, "event": "mixture_changed", "old": {e["path"]: e["weight"] for e in old},
                       "new": {e["path"]: e["weight"] for e in new}}]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # the event did not disturb the steps

    cfg, params, _ = load_run(tmp_path / "run", step=2)
    eval_loss = build_trainer(cfg).eval_loss
    logged = next(r["loss"] for r in rows if r.get("step") == 3 and "loss" in r)
    by_new, by_old = (float(eval_loss(params, jax.numpy.asarray(MixtureDataset(m).batch(2, 8, 16, cfg.train.seed))))
                      for m in (new, old))
    # The step's loss and eval_loss are one fp32 cross-entropy compiled in two programs (with and without
    # the gradient): 1e-5 relative covers their reassociation; another batch moves the loss by ~1e-2.
    assert abs(logged - by_new) < 1e-5 * abs(by_new) and abs(logged - by_old) > 1e-3, (logged, by_new, by_old)
