"""File names that artifacts of several kinds share; each kind's own files are named beside the stage that writes
them."""

EVAL_FILE = "eval.json"  # a stage's held-out evaluation report
METRICS_FILE = "metrics.jsonl"  # a training stage's curve: one JSON object per logged step
SAMPLES_FILE = "samples.png"  # a grid of samples, for people to look at
SUMMARY_FILE = "summary.json"  # a selection stage's counts (per resolution stage, or of the midtraining sample)
