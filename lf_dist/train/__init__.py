"""The training loop (ours, no HF Trainer), stage losses, schedules, checkpoints and run logs."""
