"""The decoder as pure functions over a parameter table: parameters, attention kernels, the loss, FLOP
counts and KV-cache generation."""
