"""Step time from evidence: the planner's sustained FLOP/s per chip comes from measurements.

Two kinds of evidence, one loader each, sharing the record validation:

* `BenchRecord`s, train steps measured with `anychip bench` on the shape you plan. For each, the
  sustained FLOP/s at which the step model reproduces the measured step time (bisection); the median
  per chip is kept. A scalar per chip, not a curve: a bench run measures the shape you are about to
  train, records are few, and a median shrugs off one noisy run.
* `PublishedRecord`s (cost/published.yaml), pretraining runs others published: MFU, model TFLOP/s or
  sequences/s with the model's shape. They set the default efficiency of each chip family, as a
  function of model size (`FamilyFit`), chosen by a leave-one-out test against the old constant
  (docs/calibration.md, benchmarks/calibration_loo.py). Chips without records keep DEFAULT_EFFICIENCY
  and the plan says that it is assumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from anychip.config import ModelConfig, to_dict
from anychip.cost.hardware import (
    Catalog,
    Chip,
    chips_in_use,
    format_columns,
    get_chip,
    load_catalog,
    match_device_kind,
)
from anychip.cost.step_model import DEFAULT_EFFICIENCY, REMATS, Job, Layout, step_time
from anychip.errors import UserError
from anychip.files import read_text
from anychip.model.flops import flops_per_token
from anychip.model.params import count_params


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
        return _from_mapping(cls, data, where, "model")


def _from_mapping(cls: type, data: Any, where: str, config_field: str) -> Any:
    """A record dataclass from a mapping: every required field, no unknown one, and `config_field` (a
    mapping, or None where the record allows it) turned into a ModelConfig. Errors are one line."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING]
    if missing := [k for k in required if k not in data]:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    if unknown := sorted(set(data) - known):
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
    config = data.get(config_field)
    if config is not None:
        try:
            config = ModelConfig(**config)
        except (TypeError, UserError) as e:
            raise UserError(f"{where}: bad {config_field} ({e})") from None
    try:
        return cls(**{**data, config_field: config})
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None


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


def sustained(chip: Chip, calibrated: dict[str, float], cfg: ModelConfig | None = None,
              evidence: Evidence | None = None) -> tuple[float | None, float | None, str]:
    """(sustained FLOP/s per chip, efficiency vs peak, where it comes from) for one chip and model.

    In order: the chip's bench calibration; an efficiency set in a user catalog YAML; the chip
    family's fit of published runs at this model's size; DEFAULT_EFFICIENCY, stated as assumed.
    """
    if chip.key in calibrated:
        s = calibrated[chip.key]
        return s, (s / chip.peak_bf16_flops if chip.peak_bf16_flops else None), "calibrated"
    if not chip.peak_bf16_flops:
        return None, None, ""
    eff, why = default_efficiency(chip, cfg, evidence)
    return chip.peak_bf16_flops * eff, eff, why


def _case(record: BenchRecord, catalog: Catalog) -> tuple[Job, Chip, int, Layout]:
    """The planner's view of a measured run: job, chip (with the devices per chip it ran with), device count,
    layout (the recorded device mesh)."""
    chip = get_chip(record.chip, catalog)
    matched = match_device_kind(record.device_kind, catalog)
    chip = matched if matched and matched.key == chip.key else dataclasses.replace(chip, devices_per_chip=1)
    mesh = {a: int(record.mesh.get(a, 1)) for a in ("data", "fsdp", "tensor")}
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
        preds = {"default": sustained(chip, {}, job.cfg)[0], "fit": fitted}
        preds = {k: step_time(job, chip, n, layout, v)["step"] if v else None for k, v in preds.items()}
        out.append({
            "chip": chip.key, "model": job.cfg.name, "seq_len": job.seq_len, "batch_size": job.batch,
            "n_chips": chips_in_use(chip, n), "mesh": str(layout), "remat": layout.remat, "measured_s": measured,
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


# ---------------------------------------------------------------------------------------------
# Published runs: the default efficiency per chip family (cost/published.yaml, docs/calibration.md)

FIT_METHODS = ("constant", "median", "loglinear")
DEFAULT_FIT = "median"  # the simplest method that beats the constant out of sample (benchmarks/calibration_loo.py)
LOGFIT_MIN_RECORDS = 3  # fewer points than this cannot show a trend in size: use the median
LOGFIT_MIN_DECADES = 0.5  # nor can sizes within a factor of ~3 of each other
ASSUMED = f"{DEFAULT_EFFICIENCY:.2f} assumed, no published record"  # what a plan says without evidence


@dataclass(frozen=True)
class PublishedRecord:
    """One published pretraining measurement (a record of cost/published.yaml; its header says more)."""

    chip: str  # catalog key
    chips: int
    model: str
    params_b: float  # total parameters, billions, as published
    precision: str
    framework: str
    source: str  # a URL
    quote: str  # the line of the source the figure comes from
    seq_len: int | None = None  # None: the quoted source does not state it
    mfu: float | None = None  # exactly one of mfu, model_tflops_per_chip, seq_per_s
    model_tflops_per_chip: float | None = None
    seq_per_s: float | None = None  # global; needs `shape` and `seq_len`
    shape: ModelConfig | None = None
    note: str = ""


def published_mfu(r: PublishedRecord, catalog: Catalog) -> float:
    """The record's MFU against the catalog's bf16 peak: as published, or from TFLOP/s or seq/s with
    anychip's FLOP count (model/flops.py: 6·N_matmul + 12·L·d_attn·T per token)."""
    if r.mfu is not None:
        return r.mfu
    peak = get_chip(r.chip, catalog).peak_bf16_flops or math.nan
    if r.model_tflops_per_chip is not None:
        return r.model_tflops_per_chip * 1e12 / peak
    assert r.seq_per_s is not None and r.shape is not None and r.seq_len is not None  # _check_published
    return r.seq_per_s * r.seq_len * flops_per_token(r.shape, r.seq_len) / (r.chips * peak)


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_published(r: PublishedRecord, where: str, catalog: Catalog) -> float:
    """Validate one record (one-line UserError naming `where`); returns its MFU."""
    get_chip(r.chip, catalog)
    measures = [k for k in ("mfu", "model_tflops_per_chip", "seq_per_s") if getattr(r, k) is not None]
    problems = [
        (len(measures) != 1, f"give exactly one of mfu, model_tflops_per_chip, seq_per_s (got {measures or 'none'})"),
        (not str(r.source).startswith("https://"), "source must be an https:// URL"),
        (not (isinstance(r.quote, str) and r.quote.strip()), "quote must be the source's line, not empty"),
        (r.precision != "bf16", f"precision must be bf16, the peak the planner divides by (got {r.precision!r})"),
        (not (isinstance(r.chips, int) and r.chips >= 1), f"chips must be a positive integer, got {r.chips!r}"),
        (not _positive(r.params_b), f"params_b must be a positive number, got {r.params_b!r}"),
        (r.seq_per_s is not None and (r.shape is None or not r.seq_len), "seq_per_s needs shape and seq_len"),
        (not all(_positive(getattr(r, k)) for k in measures), f"{', '.join(measures)} must be a positive number"),
        (r.seq_len is not None and not (_positive(r.seq_len) and isinstance(r.seq_len, int)),
         f"seq_len must be a positive integer or null, got {r.seq_len!r}"),
    ]
    if bad := [msg for failed, msg in problems if failed]:
        raise UserError(f"{where}: {bad[0]}")
    mfu = published_mfu(r, catalog)
    if not 0 < mfu <= 1:
        raise UserError(f"{where}: MFU {mfu:.3g} is outside (0, 1]: check the figure and the chip's peak")
    return mfu


@dataclass(frozen=True)
class FamilyFit:
    """One chip family's efficiency vs model size, fitted to its published MFUs."""

    family: str
    chips: tuple[str, ...]  # the chips whose records went in
    n: int
    median: float
    slope: float | None  # MFU per decade of parameters; None: too few records or sizes for a trend
    intercept: float | None
    lo: float  # the observed range: the trend is not extrapolated beyond it
    hi: float

    def predict(self, params_b: float | None, method: str = DEFAULT_FIT) -> float:
        if method == "constant":
            return DEFAULT_EFFICIENCY
        if method == "median" or self.slope is None or self.intercept is None or not params_b:
            return self.median
        return min(self.hi, max(self.lo, self.intercept + self.slope * math.log10(params_b)))


def fit_family(family: str, points: Sequence[tuple[str, float, float]]) -> FamilyFit:
    """Fit (chip, params_b, mfu) points: their median, and a least-squares line in log10(params)."""
    mfus = [m for _, _, m in points]
    xs = [math.log10(p) for _, p, _ in points]
    slope = intercept = None
    if len(points) >= LOGFIT_MIN_RECORDS and max(xs) - min(xs) >= LOGFIT_MIN_DECADES:
        mx, my = statistics.fmean(xs), statistics.fmean(mfus)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, mfus)) / sum((x - mx) ** 2 for x in xs)
        intercept = my - slope * mx
    return FamilyFit(family, tuple(sorted({c for c, _, _ in points})), len(points), statistics.median(mfus),
                     slope, intercept, min(mfus), max(mfus))


@dataclass(frozen=True)
class Evidence:
    """The published records, their MFUs, and which family each chip belongs to."""

    records: tuple[PublishedRecord, ...]
    mfus: tuple[float, ...]
    families: dict[str, str]  # chip key → family (a chip in none is its own family)

    def family(self, chip: str) -> str:
        return self.families.get(chip, chip)

    def fit(self, family: str, skip: int | None = None) -> FamilyFit | None:
        """The family's fit over its records (all but record `skip`); None without records."""
        points = [(r.chip, r.params_b, m) for i, (r, m) in enumerate(zip(self.records, self.mfus))
                  if i != skip and self.family(r.chip) == family]
        return fit_family(family, points) if points else None


def load_published(path: str | Path | None = None, catalog: Catalog | None = None) -> Evidence:
    """Read and validate cost/published.yaml (or another file in its format)."""
    where = str(path) if path else "published.yaml"
    text = read_text(path, "published records") if path else \
        resources.files("anychip.cost").joinpath("published.yaml").read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise UserError(f"{where}: expected a mapping with a list of `records`")
    catalog = catalog if catalog is not None else load_catalog()
    families = {get_chip(str(c), catalog).key: str(f) for f, cs in (data.get("families") or {}).items() for c in cs}
    records = tuple(_from_mapping(PublishedRecord, x, f"{where} record {i}", "shape")
                    for i, x in enumerate(data["records"]))
    mfus = tuple(_check_published(r, f"{where} record {i} ({r.chip}, {r.model})", catalog)
                 for i, r in enumerate(records))
    return Evidence(records, mfus, families)


@lru_cache(maxsize=1)
def published_evidence() -> Evidence:
    """The shipped records, read once per process."""
    return load_published()


def default_efficiency(chip: Chip, cfg: ModelConfig | None = None,
                       evidence: Evidence | None = None) -> tuple[float, str]:
    """(efficiency, where it comes from) when no bench calibration is given; see `sustained`."""
    if chip.efficiency is not None:
        return chip.efficiency, "set in the catalog"
    evidence = evidence if evidence is not None else published_evidence()
    fit = evidence.fit(evidence.family(chip.key))
    if fit is None:
        return DEFAULT_EFFICIENCY, ASSUMED
    params_b = count_params(cfg) / 1e9 if cfg is not None else None
    return fit.predict(params_b), f"published: {fit.n} runs on {'/'.join(fit.chips)}"


def leave_one_out(evidence: Evidence | None = None) -> list[dict[str, Any]]:
    """Per record: its published MFU and each method's prediction from the family's other records.

    A family's only record has nothing to be predicted from and is left out (it still sets the
    default)."""
    evidence = evidence if evidence is not None else published_evidence()
    rows = []
    for i, (r, mfu) in enumerate(zip(evidence.records, evidence.mfus)):
        fit = evidence.fit(evidence.family(r.chip), skip=i)
        if fit is None:
            continue
        rows.append({"family": fit.family, "chip": r.chip, "model": r.model, "params_b": r.params_b,
                     "chips": r.chips, "published": mfu,
                     **{m: fit.predict(r.params_b, m) for m in FIT_METHODS}})
    return rows


def loo_errors(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean absolute error, in MFU (fraction of peak), of each method over the rows."""
    return {m: statistics.fmean(abs(r[m] - r["published"]) for r in rows) for m in FIT_METHODS}


def format_loo_table(rows: Sequence[dict[str, Any]]) -> str:
    """The leave-one-out table: published MFU and each method's prediction and error, per record."""
    head = ("family", "chip", "model", "params B", "chips", "published")
    out = [head + tuple(x for m in FIT_METHODS for x in (m, "err"))]
    for r in rows:
        cells = (r["family"], r["chip"], r["model"], f"{r['params_b']:g}", str(r["chips"]), f"{r['published']:.3f}")
        out.append(cells + tuple(x for m in FIT_METHODS for x in (f"{r[m]:.3f}", f"{r[m] - r['published']:+.3f}")))
    return format_columns(out, left={0, 1, 2})
