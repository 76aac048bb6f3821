"""Training: the step, the loop and the components it runs (checkpoints, evaluation, the non-finite
guard, metrics, stop signals), the run directory, memory estimates and auto_fit."""
