"""The real train step, measured without training: lowered and linted for other platforms, compiled for
a target chip, or timed on this one."""
