"""The accelerator catalog (catalog.yaml, every number with its source) and the chip this process runs on.

The catalog is data: peak dense bf16/fp8 FLOP/s, HBM capacity and bandwidth, chip-to-chip and
between-domain bandwidth, scale-up domain size and on-demand $/chip-hour for each accelerator,
snapshot 2026-11; each value names its source in catalog.yaml itself. Users override
prices or add chips with their own YAML in the same format (`load_catalog(extra=[path])`).

A missing number stays missing: a chip without a price costs "unknown" (None), a chip without a
published peak (the generic CPU) reports no MFU. Nothing here invents a figure.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from anychip.errors import UserError
from anychip.files import read_text

Catalog = dict[str, "Chip"]

# YAML field → (Chip attribute, multiplier to SI units).
_NUMERIC = {
    "bf16_tflops": ("peak_bf16_flops", 1e12),
    "fp8_tflops": ("peak_fp8_flops", 1e12),
    "hbm_gb": ("hbm_bytes", 1e9),
    "hbm_tb_s": ("hbm_bw", 1e12),
    "link_gb_s": ("link_bw", 1e9),
    "scaleout_gb_s": ("scaleout_bw", 1e9),
    "price_per_hour": ("price_per_hour", 1.0),
    "efficiency": ("efficiency", 1.0),
    "domain": ("domain", 1),
}
_PLAIN = {"name", "vendor", "device_kinds", "attention", "training", "notes"}
FIELDS = sorted(set(_NUMERIC) | _PLAIN)


@dataclass(frozen=True)
class Chip:
    """One accelerator. Rates are per chip in SI units (FLOP/s, bytes, bytes/s); None = unknown."""

    key: str
    name: str
    peak_bf16_flops: float | None
    price_per_hour: float | None
    peak_fp8_flops: float | None = None
    hbm_bytes: float | None = None
    hbm_bw: float | None = None
    link_bw: float | None = None  # scale-up, per chip, both directions added (as vendors quote it)
    scaleout_bw: float | None = None  # between domains, per chip, one direction
    domain: int = 1
    vendor: str = ""
    # Exact jax device_kind strings of this chip → JAX devices per chip.
    device_kinds: Mapping[str, int] = field(default_factory=dict, compare=False)
    devices_per_chip: int = 1  # of the matched device_kind, else the first listed (Neuron shows NeuronCores)
    attention: str = "xla"  # "flash"/"splash"/"blockwise": attention=auto's kernel keeps no T×T scores (step_model)
    efficiency: float | None = None  # assumed sustained fraction of peak (uncalibrated default)
    training: bool = True
    notes: str = ""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def peak_flops_per_device(self) -> float | None:
        """Peak of one JAX device: what MFU must divide by when there are several devices per chip."""
        return self.per_device().peak_bf16_flops

    def per_device(self) -> Chip:
        """One JAX device of this chip as a chip of its own: the unit a mesh, and so the planner, counts in.

        Rates, memory and price are split evenly over the chip's devices (a TPU7x's two TensorCores share
        its HBM and links), and the scale-up domain is counted in devices.
        """
        k = self.devices_per_chip
        if k == 1:
            return self
        split = {name: None if getattr(self, name) is None else getattr(self, name) / k
                 for name in ("peak_bf16_flops", "peak_fp8_flops", "price_per_hour", "hbm_bytes", "hbm_bw",
                              "link_bw", "scaleout_bw")}
        return replace(self, **split, domain=self.domain * k, devices_per_chip=1)

    @property
    def usd_per_pflop_hour(self) -> float | None:
        """List price per hour of one peak bf16 PFLOP/s: the crude cross-vendor comparison."""
        if self.price_per_hour is None or not self.peak_bf16_flops:
            return None
        return self.price_per_hour / (self.peak_bf16_flops / 1e15)


# ---------------------------------------------------------------------------------------------
# Loading


def _value(raw: Any, where: str, default_date: str, origin: str) -> tuple[Any, str]:
    """A field is `value` or {value, source, date}; returns (value, 'source (date)').

    A mapping without `value` is a plain value only for device_kinds (kind → devices per chip).
    """
    if isinstance(raw, dict) and ("value" in raw or not where.endswith(".device_kinds")):
        unknown = set(raw) - {"value", "source", "date"}
        if unknown or "value" not in raw:
            raise UserError(f"{where}: expected a value or {{value, source, date}}, got keys {sorted(raw)}")
        return raw["value"], f"{raw.get('source', 'no source given')} ({raw.get('date', default_date)})"
    return raw, f"{origin} ({default_date})"


# Every number, in the file's units, lies in [low, high]: a rate of zero is no measurement (it would plan
# "inf days"; unknown is null), a price may be 0 (credits), and nothing is so large or small that the
# planner's arithmetic leaves the finite numbers.
_RANGES = {"price_per_hour": (0.0, 1e9), "efficiency": (1e-6, 1.0), "domain": (0, 1e9)}
_RATE_RANGE = (1e-6, 1e9)


def _number(value: Any, where: str, scale: float) -> float | int | None:
    if value is None:
        return None
    low, high = _RANGES.get(where.rsplit(".", 1)[-1], _RATE_RANGE)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and low <= value <= high):
        raise UserError(f"{where}: expected a number in [{low:g}, {high:g}] or null (unknown), got {value!r}")
    return int(value) if scale == 1 and isinstance(value, int) else value * scale


def _kinds(value: Any, where: str) -> dict[str, int]:
    if isinstance(value, list) and all(isinstance(k, str) for k in value):
        return {k: 1 for k in value}
    if isinstance(value, dict) and all(isinstance(n, int) and n > 0 for n in value.values()):
        return {str(k): n for k, n in value.items()}
    raise UserError(f"{where}: expected a list of device_kind strings or a mapping kind → devices per chip")


def _apply(chip: Chip, entry: dict[str, Any], where: str, date: str, origin: str) -> Chip:
    """`chip` with the fields of one YAML entry applied (validated, converted to SI units)."""
    changes: dict[str, Any] = {}
    sources = dict(chip.sources)
    for name, raw in entry.items():
        if name not in FIELDS:
            close = difflib.get_close_matches(str(name), FIELDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (fields: {', '.join(FIELDS)})"
            raise UserError(f"{where}: unknown field '{name}'{hint}")
        value, source = _value(raw, f"{where}.{name}", date, origin)
        if name in _NUMERIC:
            sources[name] = source
            attr, scale = _NUMERIC[name]
            changes[attr] = _number(value, f"{where}.{name}", scale)
        elif name == "device_kinds":
            changes[name] = _kinds(value, f"{where}.{name}")
            changes["devices_per_chip"] = next(iter(changes[name].values()), 1)  # the default configuration
        elif name == "training":
            if not isinstance(value, bool):
                raise UserError(f"{where}.training: expected true or false, got {value!r}")
            changes[name] = value
        elif name == "attention" and value not in ("flash", "splash", "blockwise", "xla"):
            raise UserError(f"{where}.attention: expected 'flash', 'splash', 'blockwise' or 'xla', got {value!r}")
        else:
            changes[name] = str(value)
    domain = changes.get("domain", chip.domain)
    if not isinstance(domain, int) or domain < 1:
        raise UserError(f"{where}.domain: must be a positive integer, got {domain!r}")
    return replace(chip, sources=sources, **changes)


def _merge(catalog: Catalog, data: Any, origin: str) -> Catalog:
    """Merge one parsed YAML document into the catalog by key (new keys add chips)."""
    if not isinstance(data, dict):
        raise UserError(f"{origin}: expected a mapping of chip keys (optionally under 'chips:')")
    date = str(data.get("date", "user file"))
    chips = data["chips"] if "chips" in data else {k: v for k, v in data.items() if k != "date"}
    if not isinstance(chips, dict):
        raise UserError(f"{origin}: 'chips' must be a mapping of chip keys")
    out = dict(catalog)
    for key, entry in chips.items():
        key, where = str(key), f"{origin}: {key}"
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"price_per_hour": entry}  # the shorthand `h100: 3.90` is a price override
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping of fields or a price")
        base = out.get(key) or Chip(key, str(entry.get("name", key)), None, None)
        out[key] = _apply(base, entry, where, date, origin)
    return out


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(read_text(path, "catalog file"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_catalog(extra: Iterable[str | Path] = ()) -> Catalog:
    """The shipped catalog, then each user YAML merged over it by chip key, in order."""
    text = resources.files("anychip.cost").joinpath("catalog.yaml").read_text()
    catalog = _merge({}, yaml.safe_load(text), "catalog.yaml")
    for path in extra:
        catalog = _merge(catalog, _read_yaml(Path(path)), str(path))
    return catalog


def get_chip(key: str, catalog: Catalog | None = None) -> Chip:
    """The catalog entry `key`; an unknown key is a UserError naming the closest one."""
    catalog = catalog if catalog is not None else load_catalog()
    if key not in catalog:
        close = difflib.get_close_matches(key.lower(), list(catalog), n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown chip '{key}' (known: {', '.join(catalog)}){hint}")
    return catalog[key]


# ---------------------------------------------------------------------------------------------
# Detection


def match_device_kind(kind: str, catalog: Catalog | None = None) -> Chip | None:
    """The entry listing this exact device_kind (case and surrounding space ignored), or None.

    Exact, not substring, matching on purpose: "NVIDIA H100 PCIe" must not inherit SXM peaks, and
    "TPU v5" (v5p) must not match "TPU v5 lite" (v5e).
    """
    catalog = catalog if catalog is not None else load_catalog()
    wanted = kind.strip().lower()
    for chip in catalog.values():
        for pattern, per_chip in chip.device_kinds.items():
            if pattern.strip().lower() == wanted:
                return replace(chip, devices_per_chip=per_chip)
    return None


def detect(price_per_hour: float | None = None, catalog: Catalog | None = None) -> Chip:
    """The catalog entry of jax.devices()[0]; an unknown device gets key 'unknown' and no peak.

    `price_per_hour` overrides the catalog price (e.g. a negotiated rate).
    """
    import jax  # here, not at module level: the catalog and planner work without initialising a backend

    kind = jax.devices()[0].device_kind
    chip = match_device_kind(kind, catalog) or Chip("unknown", kind, None, None)
    return chip if price_per_hour is None else replace(chip, price_per_hour=price_per_hour)


# ---------------------------------------------------------------------------------------------
# Cost ledger


def cost_summary(chip: Chip, n_chips: float, elapsed_s: float, tokens: float,
                 price_override: float | None = None) -> dict[str, Any]:
    """Chip-hours, dollars and $ per million tokens of a run so far.

    `n_chips` counts chips, not JAX devices (see `chips_in_use`). Cost fields are None when the
    price is unknown: the ledger never makes one up.
    """
    price = price_override if price_override is not None else chip.price_per_hour
    chip_hours = n_chips * elapsed_s / 3600.0
    cost = None if price is None else price * chip_hours
    return {
        "chip": chip.key,
        "n_chips": n_chips,
        "chip_hours": chip_hours,
        "price_per_hour": price,
        "cost_usd": cost,
        "usd_per_mtok": None if cost is None or tokens <= 0 else cost / (tokens / 1e6),
    }


def mfu(tokens_per_s: float, flops_token: float, peak_flops: float | None, n_chips: float = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over peak (None where the peak is unknown)."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_token / (peak_flops * n_chips)


def chips_in_use(chip: Chip, n_devices: int) -> float:
    """JAX devices → chips (a Trn2 chip shows as 4 logical NeuronCores with the default LNC=2)."""
    return n_devices / chip.devices_per_chip


# ---------------------------------------------------------------------------------------------
# The `anychip hardware` table


def _fmt(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None else format(value / scale, spec)


def format_catalog_table(catalog: Catalog | None = None, current: str | None = None) -> str:
    """One row per chip; `current` (a key, default: the detected device) is marked with '*'."""
    catalog = catalog if catalog is not None else load_catalog()
    if current is None:
        current = detect(catalog=catalog).key
    header = ("", "key", "name", "bf16 TFLOP/s", "HBM GB", "HBM TB/s", "link GB/s", "domain", "$/h",
              "$/PFLOP-h")
    rows = [header]
    for chip in catalog.values():
        rows.append((
            "*" if chip.key == current else "", chip.key,
            chip.name + ("" if chip.training else " [no training]"),
            _fmt(chip.peak_bf16_flops, 1e12, ",.0f"), _fmt(chip.hbm_bytes, 1e9, ".0f"),
            _fmt(chip.hbm_bw, 1e12, ".2f"), _fmt(chip.link_bw, 1e9, ",.0f"), str(chip.domain),
            _fmt(chip.price_per_hour, 1, ".2f"), _fmt(chip.usd_per_pflop_hour, 1, ".1f"),
        ))
    table = format_columns(rows, left={0, 1, 2})
    return table + ("\n* = this device. Prices: on-demand list, snapshot 2026-11; '-' = unknown "
                    "(override with --prices).")


def format_columns(rows: list[tuple[str, ...]], left: set[int] = frozenset()) -> str:
    """Rows of cells as aligned text columns: right-aligned (numbers) except the `left` ones."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows)
    return "\n".join(line.rstrip() for line in lines)
