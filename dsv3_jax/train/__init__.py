"""Training: config, schedules, optimizer, losses, the pure train step, the loop."""
