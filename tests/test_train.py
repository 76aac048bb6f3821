"""The training loop end to end, in process and through the `anychip` command."""

import json
import subprocess
import sys

import pytest

from anychip.config import load_config
from anychip.train.loop import train
from anychip.train.run_dir import RunDir

TINY_RUN = ["model=tiny", "train.batch_size=8", "train.seq_len=64", "log.every=10", "eval.batches=4",
            "eval.sample_tokens=0", "optim.warmup_steps=10"]


def test_loss_falls_within_a_few_hundred_tiny_steps(small_corpus, tmp_path):
    cfg = load_config(None, [*TINY_RUN, f"data.path={small_corpus}", f"run_dir={tmp_path / 'run'}",
                             "train.steps=200", "eval.every=100", "checkpoint.every_steps=0"])
    result = train(cfg, log=lambda _: None)
    # A uniform guess over 512 tokens costs ln(512) = 6.24 nats; the held-out loss starts there and
    # a working model + optimizer learns code structure well below 4.5 nats in 200 steps.
    assert result.initial_eval.loss > 6.0
    assert result.final_eval.loss < 4.5
    rows = RunDir(tmp_path / "run").read_metrics()
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows][:3] == [1, 10, 20]
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= r.keys()
        assert r["tokens"] == r["step"] * 8 * 64
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 100, 200]


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_grad_accumulation_matches_the_full_batch(small_corpus, tmp_path):
    losses = {}
    for accum in (1, 4):
        cfg = load_config(None, [*TINY_RUN, f"data.path={small_corpus}", f"run_dir={tmp_path / str(accum)}",
                                 "train.steps=3", "log.every=1", f"train.grad_accum={accum}",
                                 "compute.dtype=float32", "checkpoint.every_steps=0"])
        train(cfg, log=lambda _: None)
        losses[accum] = [r["loss"] for r in RunDir(tmp_path / str(accum)).read_metrics() if "loss" in r]
    # Same data, same mean gradient: only fp32 summation order differs (~1e-6 relative).
    assert losses[1] == pytest.approx(losses[4], rel=1e-4)


def anychip(*args, cwd):
    return subprocess.run([sys.executable, "-m", "anychip.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)


def test_cli_prepare_train_eval_generate_report(tmp_path, small_corpus):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * 40)
    r = anychip("data", "prepare", corpus, "--out", tmp_path / "data", "--vocab-size", 300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 12

    r = anychip("train", *TINY_RUN, "train.steps=30", "eval.every=15", "model.vocab_size=300",
                f"data.path={tmp_path / 'data'}", "run_dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "held-out loss" in r.stdout and (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "tokenizer.json").is_file() and any((tmp_path / "run" / "checkpoints").iterdir())

    r = anychip("eval", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    loss = float(r.stdout.split("held-out loss ")[1].split()[0])
    tokens = int(r.stdout.split(" tokens")[0].split("|")[-1].replace(",", ""))
    last = [row for row in RunDir(tmp_path / "run").read_metrics() if "eval_loss" in row][-1]
    # `anychip eval` scores every held-out token in fp32; the run's own evaluation the whole windows of
    # its eval batches in bf16 (test_eval.py holds the two to each other on the same windows). Same
    # checkpoint: close, and not fewer tokens.
    assert tokens >= last["eval_tokens"] and loss == pytest.approx(last["eval_loss"], abs=0.05)

    r = anychip("generate", "run", "--prompt", "def f", "--max-new-tokens", 20, "--temperature", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f") and len(r.stdout) > len("def f")

    r = anychip("report", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Continuing from this run on data tokenized differently would silently train on wrong ids.
    r = anychip("train", *TINY_RUN, "init_from=run", f"data.path={small_corpus}", "run_dir=run2", cwd=tmp_path)
    assert r.returncode == 2 and "another tokenizer than init_from=run" in r.stderr, r.stderr


@pytest.mark.parametrize("args, fragment", [
    (["train", "train.stesp=3"], "did you mean 'train.steps'"),
    (["train", "optim.lr=-0.1"], "optim.lr must be positive"),
    (["train", "model.n_heads=5"], "does not divide model.d_model"),
    (["train", "model.n_kv_heads=4"], "does not divide model.n_heads"),
    (["train", "train.seq_len=2048"], "exceeds model.max_seq_len"),
    (["train", "model=tiny", "data.path=DATA"], "has 512 tokens but model.vocab_size is 300"),
    (["train", "missing.yaml"], "config file not found"),
    (["eval", "nowhere"], "not a run directory"),
])
def test_user_errors_exit_2_with_one_line(args, fragment, tmp_path, small_corpus):
    args = [a.replace("DATA", str(small_corpus)) for a in args]
    if "model=tiny" in args:
        args.append("model.vocab_size=300")
    run_dir = [f"run_dir={tmp_path / 'run'}"] if args[0] == "train" else []
    r = anychip(*args, *run_dir, cwd=tmp_path)
    assert r.returncode == 2
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_tensorboard_events_mirror_the_metrics(small_corpus, tmp_path):
    cfg = load_config(None, [*TINY_RUN, f"data.path={small_corpus}", f"run_dir={tmp_path / 'run'}",
                             "train.steps=3", "log.every=1", "log.tensorboard=true"])
    train(cfg, log=lambda _: None)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"loss", b"grad_norm", b"tokens_per_s", b"eval_loss"):  # scalar tags are stored verbatim
        assert tag in data
