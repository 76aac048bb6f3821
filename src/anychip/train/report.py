"""Plots of a run: loss (train and held-out) and throughput against step, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: CI and servers have no display
import matplotlib.pyplot as plt

from anychip.errors import UserError
from anychip.files import atomic_file
from anychip.train.run_dir import RunDir


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.png (or `out`): loss curves on top, tokens/s (and MFU) below."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"run directory not found: {run}")
    records = run.read_metrics()
    train = _rows_with(records, "loss", "tokens_per_s")
    evals = _rows_with(records, "eval_loss")
    if not train and not evals:
        raise UserError(f"{run} has no metrics to plot (no metrics.jsonl rows)")
    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.set_title(f"anychip run {run.path.name}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    # Step 1's row includes one-time warm-up (first execution, allocation): it would flatten the axis.
    speed = [r for r in train if r["step"] > 1] or train
    ax_speed.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], color="tab:green")
    ax_speed.set_ylabel("tokens / s", color="tab:green")
    ax_speed.set_ylim(bottom=0)  # from zero, so noise does not look like a trend
    ax_speed.set_xlabel("step")
    ax_speed.grid(alpha=0.3)
    mfus = [(r["step"], 100 * r["mfu"]) for r in _rows_with(speed, "mfu")]
    if mfus:
        ax_mfu = ax_speed.twinx()
        ax_mfu.plot(*zip(*mfus), color="tab:purple", ls="--")
        ax_mfu.set_ylabel("MFU (%)", color="tab:purple")
    out = Path(out) if out else run.report
    fig.tight_layout()
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return out


def _rows_with(records: list[dict], *keys: str) -> list[dict]:
    """The rows whose `keys` are all numbers (a hand-edited or damaged row is left out, not plotted)."""
    return [r for r in records if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for k in keys)]
