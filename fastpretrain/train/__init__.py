"""Training: config, the step loop, optimizer and schedule, checkpoints, metrics."""
