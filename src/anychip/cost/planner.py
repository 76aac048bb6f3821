"""Plan a pretraining job on every catalog chip: the best layout, its wall time and its cost.

For each chip: search mesh layouts (data × fsdp × tensor, as `parallel/mesh.py` builds them), grad
accumulation and remat (none / dots / full), drop what does not fit in HBM_USABLE of HBM (the memory
model in `step_model.py`), keep the fastest (its step-time model, calibrated per chip where records
exist: `calibration.py`). Rows are sorted by cost; docs/planner.md states every assumption.

Layouts and memory are per JAX device, as a mesh is built: a chip that shows several devices (TPU7x's two
TensorCores, Trainium's NeuronCores) is planned as that many devices sharing its HBM, links and price
(`Chip.per_device`), so a row's mesh is the one to train with and `--verify` compiles exactly it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from anychip.config import ModelConfig, load_config
from anychip.cost.calibration import ASSUMED, BenchRecord, fit_sustained, load_records, sustained
from anychip.cost.hardware import Catalog, Chip, format_columns, get_chip, load_catalog
from anychip.cost.step_model import HBM_USABLE, REMATS, Job, Layout, memory_per_device, step_time
from anychip.errors import UserError
from anychip.model.flops import flops_per_token

DEFAULT_BATCH_TOKENS = 2**22  # ≈4M tokens per step when no global batch is given (Llama-2-style)
MAX_CHIPS = 2**17


@dataclass(frozen=True)
class PlanRow:
    """The best layout of one chip at one chip count; `layout` None = infeasible (see `note`)."""

    chip: str
    chip_name: str
    n_chips: int
    layout: Layout | None
    micro_rows: int = 0  # sequences per device per microbatch
    memory_bytes: float = math.nan  # per device, as hbm_bytes
    hbm_bytes: float | None = None
    devices_per_chip: int = 1
    step_s: float = math.inf
    mfu: float | None = None
    tokens_per_s_per_chip: float = 0.0
    wall_s: float = math.inf
    cost_usd: float | None = None
    usd_per_mtok: float | None = None
    efficiency: float | None = None
    efficiency_source: str = ""  # 'calibrated', 'published: …', calibration.ASSUMED, 'set in the catalog'
    breakdown: dict[str, float] = field(default_factory=dict, compare=False)
    note: str = ""

    @property
    def calibrated(self) -> bool:
        """The step time uses this chip's `anychip bench` records (`--calibration`)."""
        return self.efficiency_source == "calibrated"


_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_tokens(s: str | float) -> int:
    """'6.3T', '300B', '2e9', 1_000_000 → token count (K/M/B/T are powers of 1000; B = billion)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", str(s).lower())
    value = float(m.group(1)) * _SUFFIX[m.group(2)] if m and m.group(1).count(".") <= 1 else math.nan
    if not math.isfinite(value) or value < 1:
        raise UserError(f"tokens must be a positive count like 6.3T, 300B or 2e9, got '{s}'")
    return round(value)


def parse_duration(s: str | float) -> float:
    """'30d', '12h', '1d12h', '90min', '2w' → seconds (a bare number is seconds)."""
    text = str(s).strip().lower()
    parts = re.findall(r"([0-9.]+)\s*(min|[smhdw]?)", text)
    leftover = re.sub(r"[0-9.]+\s*(min|[smhdw]?)", "", text).strip()
    if not parts or leftover or any(p[0].count(".") > 1 for p in parts):
        raise UserError(f"expected a duration like 30d, 12h or 1d12h, got '{s}'")
    seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"the deadline must be positive, got '{s}'")
    return seconds


def resolve_model(spec: ModelConfig | str) -> ModelConfig:
    """A ModelConfig, a preset name ('afm-3b') or a config YAML file (its `model:` section)."""
    if isinstance(spec, ModelConfig):
        return spec
    if str(spec).endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_config(spec).model
    return load_config(None, [f"model={spec}"]).model


def make_job(model: ModelConfig | str, tokens: int | str, seq_len: int, batch_size: int | None = None,
             compute_dtype: str = "bfloat16") -> Job:
    cfg = resolve_model(model)
    if seq_len <= 0 or seq_len > cfg.max_seq_len:
        raise UserError(f"seq_len must be in 1..{cfg.max_seq_len} for model {cfg.name}, got {seq_len}")
    batch = batch_size if batch_size is not None else max(1, DEFAULT_BATCH_TOKENS // seq_len)
    if batch <= 0:
        raise UserError(f"batch_size must be positive, got {batch}")
    return Job(cfg, parse_tokens(tokens), seq_len, batch, 4 if compute_dtype == "float32" else 2)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _layouts(job: Job, device: Chip, n: int, remats: Sequence[str]) -> Iterable[tuple[Layout, int]]:
    """(layout with grad_accum=1, sequences per device per step) for each valid data × fsdp × tensor of n devices."""
    cfg = job.cfg
    for t in (1, 2, 4, 8, 16, 32, 64):
        tp_ok = all(x % t == 0 for x in (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff))
        if t > min(device.domain, n) or n % t or not tp_ok:
            continue  # TP only inside one scale-up domain, on whole heads and MLP columns
        for f in _divisors(n // t):
            d = n // (t * f)
            if cfg.d_model % f or job.batch % (d * f):
                continue  # FSDP must split the embed axis; each batch shard needs whole sequences
            for remat in remats:
                yield Layout(d, f, t, 1, remat), job.batch // (d * f)


def _row(job: Job, chip: Chip, n: int, layout: Layout, s: float, eff: float | None, how: str) -> PlanRow:
    """The plan row of `n` chips running `layout` over their devices, at `s` sustained FLOP/s per chip."""
    k = chip.devices_per_chip
    parts = step_time(job, chip, n * k, layout, s)
    step = parts["step"]
    steps = math.ceil(job.tokens / (job.batch * job.seq_len))
    wall = steps * step
    cost = None if chip.price_per_hour is None else wall / 3600 * n * chip.price_per_hour
    model_flops = flops_per_token(job.cfg, job.seq_len) * job.batch * job.seq_len
    return PlanRow(
        chip=chip.key, chip_name=chip.name, n_chips=n, layout=layout,
        micro_rows=job.batch // (layout.data * layout.fsdp * layout.grad_accum),
        memory_bytes=memory_per_device(job, layout, chip.attention)["total"], hbm_bytes=chip.per_device().hbm_bytes,
        devices_per_chip=k,
        step_s=step, mfu=None if not chip.peak_bf16_flops else model_flops / (step * n * chip.peak_bf16_flops),
        tokens_per_s_per_chip=job.batch * job.seq_len / step / n, wall_s=wall, cost_usd=cost,
        usd_per_mtok=None if cost is None else cost / (steps * job.batch * job.seq_len / 1e6),
        efficiency=eff, efficiency_source=how, breakdown=parts,
    )


def best_layout(job: Job, chip: Chip, n: int, calibrated: dict[str, float] | None = None,
                remats: Sequence[str] = REMATS) -> PlanRow:
    """The fastest layout that fits, with the largest microbatch that fits for each mesh and remat."""
    s, eff, how = sustained(chip, calibrated or {}, job.cfg)
    if s is None:
        return PlanRow(chip=chip.key, chip_name=chip.name, n_chips=n, layout=None, note="no peak FLOP/s: calibrate or set bf16_tflops")
    device = chip.per_device()
    budget = HBM_USABLE * device.hbm_bytes if device.hbm_bytes else math.inf
    best: PlanRow | None = None
    untimed = False  # a layout fits but needs a bandwidth the catalog does not know
    for base, rows in _layouts(job, device, n * chip.devices_per_chip, remats):
        for ga in _divisors(rows):
            layout = replace(base, grad_accum=ga)
            if memory_per_device(job, layout, chip.attention)["total"] <= budget:
                row = _row(job, chip, n, layout, s, eff, how)
                untimed |= not math.isfinite(row.step_s)
                if math.isfinite(row.step_s) and (best is None or row.step_s < best.step_s):
                    best = row
                break  # more accumulation only adds collectives: the first fit is this layout's best
    if best is None:
        note = ("no step time: a bandwidth this layout needs is unknown (link_gb_s, scaleout_gb_s)" if untimed
                else f"no layout of batch {job.batch} fits in HBM")
        return PlanRow(chip=chip.key, chip_name=chip.name, n_chips=n, layout=None, note=note)
    return best


def _counts(chip: Chip) -> list[int]:
    """Sensible chip counts: powers of two, and whole domains when the domain is not one."""
    counts = {2**k for k in range(18)} | {chip.domain * 2**k for k in range(18)}
    return sorted(c for c in counts if c <= MAX_CHIPS)


def _meet_deadline(job: Job, chip: Chip, deadline_s: float, calibrated: dict[str, float],
                   remats: Sequence[str]) -> PlanRow:
    """The smallest sensible chip count whose best layout finishes within the deadline."""
    s, _, _ = sustained(chip, calibrated, job.cfg)
    if s is None:
        return best_layout(job, chip, 0, calibrated, remats)  # the "no peak FLOP/s" row
    total_flops = flops_per_token(job.cfg, job.seq_len) * job.tokens
    fastest: PlanRow | None = None
    for n in _counts(chip):
        if n > job.batch * chip.domain or total_flops / (n * s) > deadline_s:
            continue  # even perfect scaling misses the deadline (or the batch cannot be split)
        row = best_layout(job, chip, n, calibrated, remats)
        if row.layout and row.wall_s <= deadline_s:
            return row
        fastest = row if row.layout and (fastest is None or row.wall_s < fastest.wall_s) else fastest
    why = f"fastest {fastest.wall_s / 86400:.1f} d on {fastest.n_chips}" if fastest else "nothing fits"
    return PlanRow(chip=chip.key, chip_name=chip.name, n_chips=0, layout=None, note=f"cannot meet the deadline ({why})")


def _chips(keys: Sequence[str] | None, catalog: Catalog) -> list[Chip]:
    """The chips asked for (default: every training chip with a peak and an HBM size)."""
    if not keys:
        return [c for c in catalog.values() if c.training and c.peak_bf16_flops and c.hbm_bytes]
    chips = [get_chip(k.strip(), catalog) for k in keys]
    for c in chips:
        if not c.training:
            raise UserError(f"{c.key} ({c.name}) is inference-only: the Neuron SDK does not train on it")
    return chips


def _setup(model: ModelConfig | str, tokens: int | str, seq_len: int, batch_size: int | None,
           prices: Sequence, calibration: Sequence, catalog: Catalog | None) -> tuple[Job, Catalog, dict]:
    job = make_job(model, tokens, seq_len, batch_size)
    catalog = catalog if catalog is not None else load_catalog(prices)
    return job, catalog, fit_sustained(load_records(calibration), catalog) if calibration else {}


def _order(row: PlanRow) -> tuple:
    return (row.layout is None, row.note.startswith("over budget"), row.cost_usd is None,
            row.cost_usd or 0.0, row.wall_s)


def plan(model: ModelConfig | str, tokens: int | str, seq_len: int, chips: Sequence[str] | None = None, *,
         num_chips: int | None = None, deadline: float | str | None = None, budget: float | None = None,
         batch_size: int | None = None, prices: Sequence[str | Path] = (),
         calibration: Sequence[str | Path | BenchRecord] = (), remats: Sequence[str] = REMATS,
         catalog: Catalog | None = None) -> list[PlanRow]:
    """The best layout per chip, at `num_chips` or at the fewest chips meeting `deadline`, by cost."""
    job, catalog, calibrated = _setup(model, tokens, seq_len, batch_size, prices, calibration, catalog)
    selected = _chips(chips, catalog)
    if not remats or set(remats) - set(REMATS):
        raise UserError(f"remat must be among {', '.join(REMATS)}, got {', '.join(remats) or 'nothing'}")
    if (num_chips is None) == (deadline is None):
        raise UserError("give exactly one of --num-chips N or --deadline (e.g. 30d)")
    if num_chips is not None:
        if num_chips <= 0:
            raise UserError(f"--num-chips must be positive, got {num_chips}")
        rows = [best_layout(job, c, num_chips, calibrated, remats) for c in selected]
    else:
        secs = parse_duration(deadline)
        rows = [_meet_deadline(job, c, secs, calibrated, remats) for c in selected]
        if not any(r.layout for r in rows):
            raise UserError(f"no chip can train {job.tokens:.3g} tokens within {secs / 86400:.3g} days: "
                            + "; ".join(f"{r.chip}: {r.note}" for r in rows))
    if budget is not None:
        rows = [replace(r, note="over budget") if r.cost_usd is not None and r.cost_usd > budget else r
                for r in rows]
    return sorted(rows, key=_order)


def sweep(model: ModelConfig | str, tokens: int | str, seq_len: int, chips: Sequence[str] | None = None, *,
          counts: Sequence[int] = tuple(2**k for k in range(5, 15)), batch_size: int | None = None,
          prices: Sequence[str | Path] = (), calibration: Sequence[str | Path | BenchRecord] = (),
          catalog: Catalog | None = None) -> list[PlanRow]:
    """Feasible best rows of each chip at several chip counts: the points of the Pareto plot."""
    job, catalog, calibrated = _setup(model, tokens, seq_len, batch_size, prices, calibration, catalog)
    rows = [best_layout(job, c, n, calibrated) for c in _chips(chips, catalog) for n in counts]
    return [r for r in rows if r.layout]


def _efficiency_note(r: PlanRow) -> str:
    """'eff 0.66 published: 9 runs on tpu-v5p', 'efficiency 0.45 assumed, no published record', 'eff 0.31 calibrated'."""
    if r.efficiency is None:
        return "calibrated"  # a fitted sustained rate on a chip without a peak (no efficiency to show)
    if r.efficiency_source == ASSUMED:
        return f"efficiency {r.efficiency_source}"
    return f"eff {r.efficiency:.2f} {r.efficiency_source}".rstrip()


def format_plan_table(rows: Sequence[PlanRow]) -> str:
    """A text table, one row per chip (and chip count), in the given order."""
    head = ("chip", "chips", "mesh dxfxt", "micro x accum", "remat", "mem/HBM GB", "step s", "MFU",
            "tok/s/chip", "days", "cost", "$/Mtok", "note")
    out = [head]
    for r in rows:
        if r.layout is None:
            out.append((r.chip, str(r.n_chips or "-")) + ("",) * 10 + (r.note,))
            continue
        hbm = "?" if r.hbm_bytes is None else f"{r.hbm_bytes / 1e9:.0f}"
        eff = _efficiency_note(r)
        per_device = f"{r.devices_per_chip} devices per chip, mesh and memory per device" if r.devices_per_chip > 1 else ""
        out.append((
            r.chip, f"{r.n_chips:,}", str(r.layout), f"{r.micro_rows} x {r.layout.grad_accum}",
            r.layout.remat, f"{r.memory_bytes / 1e9:.0f}/{hbm}", f"{r.step_s:.2f}",
            "-" if r.mfu is None else f"{100 * r.mfu:.0f}%", f"{r.tokens_per_s_per_chip:,.0f}",
            f"{r.wall_s / 86400:.1f}", "unknown" if r.cost_usd is None else f"${r.cost_usd:,.0f}",
            "-" if r.usd_per_mtok is None else f"{r.usd_per_mtok:.3f}",
            ", ".join(x for x in (eff, per_device, r.note) if x),
        ))
    return format_columns(out, left={0, 2, 4, 12})


def pareto_plot(rows: Sequence[PlanRow], path: str | Path, title: str = "") -> Path:
    """Cost vs wall time, one line per chip through its chip counts; the Pareto frontier in black."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global pyplot backend state
    from matplotlib.figure import Figure

    pts = [r for r in rows if r.layout and r.cost_usd is not None]
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in dict.fromkeys(r.chip for r in pts):
        mine = sorted((r for r in pts if r.chip == key), key=lambda r: r.n_chips)
        ax.plot([r.wall_s / 86400 for r in mine], [r.cost_usd for r in mine], "o-", label=key, alpha=0.8)
        for r in mine:
            ax.annotate(str(r.n_chips), (r.wall_s / 86400, r.cost_usd), fontsize=6, alpha=0.6)
    by_time = sorted(pts, key=lambda r: (r.wall_s, r.cost_usd))
    frontier = [r for i, r in enumerate(by_time) if all(r.cost_usd < q.cost_usd for q in by_time[:i])]
    ax.step([r.wall_s / 86400 for r in frontier], [r.cost_usd for r in frontier], "k--", where="post",
            label="Pareto frontier", linewidth=1)
    unpriced = sorted({r.chip for r in rows if r.layout and r.cost_usd is None})
    ax.set(xscale="log", yscale="log", xlabel="wall time (days)", ylabel="cost (USD, list price)",
           title=title + (f"\n(no price: {', '.join(unpriced)})" if unpriced else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
