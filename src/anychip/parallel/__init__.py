"""Sharding is data: the device mesh and the logical-axis rules (`mesh`), and multi-process start-up
(`distributed`)."""
