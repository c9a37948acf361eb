"""Post-training: midtraining and SFT data, model merging, preference optimisation."""
