"""What every area of krea2_core shares (curation, captioning, models, training, post-training, the expander):
small helpers that belong to no one stage."""
