"""Golden losses: a tiny fp32 run on a synthetic corpus must reproduce the per-step training losses in
tests/assets/losses/tiny.txt, so that a change that moves the numerics (init, data order, optimizer,
model) fails CI instead of drifting silently. A change that moves them on purpose regenerates the file
(`python tests/test_golden_loss.py`) and says why in its commit.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from anychip.config import load_config
from anychip.data.prepare import prepare
from anychip.train.loop import train
from anychip.train.run_dir import RunDir

ASSET = Path(__file__).parent / "assets" / "losses" / "tiny.txt"
RUN = ["model=tiny", "train.steps=30", "train.batch_size=8", "train.seq_len=64", "log.every=1",
       "eval.every=1000", "eval.batches=1", "eval.sample_tokens=0", "compute.dtype=float32",
       "checkpoint.every_steps=0", "optim.warmup_steps=5"]
# Same jax/XLA: bit-identical. Another XLA version may fuse and sum in another order: fp32 round-off
# after 30 steps stays ~1e-6 relative; a real change (a reordered batch, an init or optimizer change)
# moves step-30 losses by 1e-2 or more.
TOLERANCE = 1e-4


def synthetic_corpus(folder: Path) -> None:
    """60 small Python-like documents from a seeded RNG: stable across Python versions and machines."""
    rng = random.Random(0)
    names = ["alpha", "beta", "gamma", "delta", "size", "count", "value", "items", "total", "index"]
    folder.mkdir()
    for i in range(60):
        lines = [f"def {rng.choice(names)}_{i}({rng.choice(names)}, {rng.choice(names)}):"]
        for _ in range(rng.randint(5, 25)):
            a, b, c = (rng.choice(names) for _ in range(3))
            lines.append(f"    {a} = {b} {rng.choice('+-*')} {c} + {rng.randint(0, 99)}")
        lines.append(f"    return {rng.choice(names)}\n")
        (folder / f"doc{i:02d}.py").write_text("\n".join(lines))


def run_losses(tmp_path: Path) -> list[tuple[int, float]]:
    synthetic_corpus(tmp_path / "src")
    prepare([str(tmp_path / "src")], tmp_path / "data", vocab_size=512, val_fraction=0.1, log=lambda _: None)
    cfg = load_config(None, [*RUN, f"data.path={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}"])
    train(cfg, log=lambda _: None)
    return [(r["step"], r["loss"]) for r in RunDir(tmp_path / "run").read_metrics() if "loss" in r]


def test_tiny_run_reproduces_the_golden_losses(tmp_path):
    golden = [(int(step), float(loss)) for step, loss in (line.split() for line in ASSET.read_text().splitlines())]
    got = run_losses(tmp_path)
    assert [s for s, _ in got] == [s for s, _ in golden]
    for (step, loss), (_, expected) in zip(got, golden):
        assert loss == pytest.approx(expected, rel=TOLERANCE), f"step {step}"


if __name__ == "__main__":  # regenerate the golden file
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        losses = run_losses(Path(tmp))
    ASSET.write_text("".join(f"{step} {loss:.8f}\n" for step, loss in losses))
    print(f"wrote {ASSET} ({len(losses)} steps)", file=sys.stderr)
