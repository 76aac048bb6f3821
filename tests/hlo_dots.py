"""What the dots of a compiled program take: read from XLA's optimized HLO text (tests only)."""

import re

import pytest

from anychip.jaxenv import cpu_flags_have_bf16

# XLA:CPU gives YNNPACK bf16 dots only where the CPU has bf16 dot instructions; elsewhere it upcasts all.
needs_cpu_bf16_dots = pytest.mark.skipif(not cpu_flags_have_bf16(), reason="this CPU has no bf16 dot instructions")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[")


def dot_operand_types(hlo: str) -> list[str]:
    """The element type of every dot operand in `hlo` (`compiled.as_text()`), e.g. ["bf16", "bf16", "f32", ...]:
    dots inside fusions (YNNPACK's on CPU) and plain ones alike. Instruction names are unique per module."""
    lines = hlo.splitlines()
    types = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, lines) if m}
    operands = [re.match(r"%([^,\s)]+), %([^,\s)]+)", line.split(" dot(", 1)[1]).groups()
                for line in lines if " dot(" in line]
    return [types[name] for pair in operands for name in pair]
