"""Training: distribution (FSDP), the run folder and checkpoints, data, previews."""
