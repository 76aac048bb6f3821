"""Step time from evidence: measured train steps (`BenchRecord`s) calibrate the planner's sustained
FLOP/s per chip, and a leave-one-out report says how well the model predicts a measurement it was
not fitted to.

For each record the planner finds the sustained FLOP/s at which its own step model reproduces the
measured step time, by bisection, and keeps the median per chip. One scalar per chip rather than a
curve in arithmetic intensity: a bench run measures the shape you are about to train, records are
few, and a median shrugs off one noisy run. Its limit: a scalar fitted on a small model overstates
the step time of a much larger one, so calibrate with the shape you plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from anychip.config import ModelConfig, to_dict
from anychip.cost.hardware import Catalog, Chip, format_columns, get_chip, load_catalog, match_device_kind
from anychip.cost.step_model import DEFAULT_EFFICIENCY, REMATS, Job, Layout, step_time
from anychip.errors import UserError
from anychip.files import read_text


@dataclass(frozen=True)
class BenchRecord:
    """One measured train step: what `anychip bench --json` writes and what calibration reads."""

    chip: str  # catalog key
    model: ModelConfig
    seq_len: int
    batch_size: int
    n_devices: int
    mesh: dict[str, int]
    remat: str
    step_time_s: float
    grad_accum: int = 1
    compute_dtype: str = "bfloat16"
    loss_chunk: int = 0
    attention: str = "xla"
    device_kind: str = ""
    backend: str = ""
    compile_time_s: float | None = None
    tokens_per_s: float | None = None
    flops_per_token: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    final_loss: float | None = None
    jax: str = ""
    jaxlib: str = ""
    python: str = ""
    platform_version: str = ""  # e.g. the CUDA version
    steps: int = 0
    warmup: int = 0
    profile: dict[str, Any] | None = None  # `anychip bench --profile`: device time by kind

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["model"] = to_dict(self.model)
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> BenchRecord:
        """A record from parsed JSON; a missing or unknown field is a one-line UserError naming `where`."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING]
        if missing := [k for k in required if k not in data]:
            raise UserError(f"{where}: missing {', '.join(missing)}")
        if unknown := sorted(set(data) - known):
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            model = ModelConfig(**data["model"])
        except TypeError as e:
            raise UserError(f"{where}: bad model ({e})") from None
        return cls(**{**data, "model": model})


def load_records(sources: Iterable[str | Path | BenchRecord]) -> list[BenchRecord]:
    """Bench records from JSON files (one record or a list each), or records as they are."""
    records: list[BenchRecord] = []
    for src in sources:
        if isinstance(src, BenchRecord):
            records.append(src)
            continue
        try:
            data = json.loads(read_text(src, "calibration file"))
        except json.JSONDecodeError as e:
            raise UserError(f"{src}: not valid JSON ({e.msg} at line {e.lineno})") from None
        items = data if isinstance(data, list) else [data]
        records += [BenchRecord.from_json(x, f"{src}" + (f" record {i}" if len(items) > 1 else ""))
                    for i, x in enumerate(items)]
    return records


def sustained(chip: Chip, calibrated: dict[str, float]) -> tuple[float | None, float | None, bool]:
    """(sustained FLOP/s per chip, efficiency vs peak, calibrated?) for one chip."""
    if chip.key in calibrated:
        s = calibrated[chip.key]
        return s, (s / chip.peak_bf16_flops if chip.peak_bf16_flops else None), True
    if not chip.peak_bf16_flops:
        return None, None, False
    eff = chip.efficiency if chip.efficiency is not None else DEFAULT_EFFICIENCY
    return chip.peak_bf16_flops * eff, eff, False


def _case(record: BenchRecord, catalog: Catalog) -> tuple[Job, Chip, int, Layout]:
    """The planner's view of a measured run: job, chip, chip count, layout (over chips, not devices)."""
    chip = get_chip(record.chip, catalog)
    matched = match_device_kind(record.device_kind, catalog)
    per_chip = matched.devices_per_chip if matched and matched.key == chip.key else 1
    mesh = {a: int(record.mesh.get(a, 1)) for a in ("data", "fsdp", "tensor")}
    for axis in ("fsdp", "data", "tensor"):  # Neuron: a chip's cores count as one device of the mesh
        if per_chip > 1 and mesh[axis] % per_chip == 0:
            mesh[axis] //= per_chip
            per_chip = 1
    remat = record.remat if record.remat in REMATS else "dots"  # dots_no_batch ≈ dots
    layout = Layout(mesh["data"], mesh["fsdp"], mesh["tensor"], record.grad_accum, remat)
    job = Job(record.model, 1, record.seq_len, record.batch_size, 4 if record.compute_dtype == "float32" else 2,
              record.loss_chunk)
    return job, chip, layout.data * layout.fsdp * layout.tensor, layout


def _implied_sustained(record: BenchRecord, catalog: Catalog) -> float:
    """The sustained FLOP/s per chip at which the model reproduces the measured step time (bisection)."""
    job, chip, n, layout = _case(record, catalog)
    target = record.step_time_s
    lo, hi = 1e3, 1e19
    if step_time(job, chip, n, layout, hi)["step"] >= target:
        return math.inf  # communication/memory alone already explain the time: compute cannot be fitted
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if step_time(job, chip, n, layout, mid)["step"] > target else (lo, mid)
    return math.sqrt(lo * hi)


def fit_sustained(records: Sequence[BenchRecord], catalog: Catalog | None = None) -> dict[str, float]:
    """Per chip: the median over its records of the implied sustained FLOP/s."""
    catalog = catalog if catalog is not None else load_catalog()
    implied: dict[str, list[float]] = {}
    for r in records:
        s = _implied_sustained(r, catalog)
        if math.isfinite(s):
            implied.setdefault(r.chip, []).append(s)
    return {k: statistics.median(v) for k, v in implied.items()}


def calibration_report(records: Sequence[BenchRecord], catalog: Catalog | None = None) -> list[dict[str, Any]]:
    """Per record: measured step time, the prediction with the default efficiency and after fitting.

    The fitted prediction for a record uses only the chip's other records (leave-one-out) when there
    are any, so its error is an honest out-of-sample figure; with one record it is in-sample (= 0).
    """
    catalog = catalog if catalog is not None else load_catalog()
    out = []
    for i, r in enumerate(records):
        job, chip, n, layout = _case(r, catalog)
        measured, implied = r.step_time_s, _implied_sustained(r, catalog)
        others = [x for j, x in enumerate(records) if j != i and x.chip == r.chip]
        fitted = fit_sustained(others or [r], catalog).get(chip.key)
        preds = {"default": sustained(chip, {})[0], "fit": fitted}
        preds = {k: step_time(job, chip, n, layout, v)["step"] if v else None for k, v in preds.items()}
        out.append({
            "chip": chip.key, "model": job.cfg.name, "seq_len": job.seq_len, "batch_size": job.batch,
            "n_chips": n, "mesh": str(layout), "remat": layout.remat, "measured_s": measured,
            "predicted_default_s": preds["default"], "predicted_fit_s": preds["fit"],
            "error_default": None if preds["default"] is None else preds["default"] / measured - 1,
            "error_fit": None if preds["fit"] is None else preds["fit"] / measured - 1,
            "fit": "leave-one-out" if others else "in-sample",
            "implied_efficiency": implied / chip.peak_bf16_flops if chip.peak_bf16_flops else None,
            "implied_tflops": implied / 1e12,
        })
    return out


def format_calibration_table(rows: Sequence[dict[str, Any]]) -> str:
    """Measured vs predicted step time per record, before and after fitting the efficiency."""
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    out = [("chip", "model", "batch x seq", "mesh", "remat", "measured s", "default s", "err", "fitted s",
            "err", "eff")]
    out += [(r["chip"], r["model"], f"{r['batch_size']} x {r['seq_len']}", r["mesh"], r["remat"],
             f(r["measured_s"], ".4f"), f(r["predicted_default_s"], ".4f"), f(r["error_default"], "+.0%"),
             f(r["predicted_fit_s"], ".4f"), f(r["error_fit"], "+.0%"), f(r["implied_efficiency"], ".2f"))
            for r in rows]
    return format_columns(out, left={0, 1, 3, 4})
