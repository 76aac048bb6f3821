"""What a token costs on each chip: the accelerator catalog and detection, the planner's model of a step's
memory and time, its calibration from measurements, and the plan search."""
