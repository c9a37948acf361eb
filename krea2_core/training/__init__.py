"""Model training: progressive-resolution pretraining, iREPA alignment, checkpoints, schedules and evaluation."""
