"""The accelerator catalog and detection of the chip this process runs on (minimal; see issue 6)."""

from __future__ import annotations

from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class Chip:
    key: str
    name: str
    peak_bf16_flops: float | None
    price_per_hour: float | None


def detect(price_per_hour: float | None = None) -> Chip:
    """The catalog entry of jax.devices()[0]."""
    kind = jax.devices()[0].device_kind
    if "H100" in kind:
        return Chip("h100", kind, 989e12, price_per_hour or 6.88)
    return Chip("cpu", kind, None, price_per_hour)
