"""Held-out evaluation: prompt following scored by the world's checker, with 95% confidence intervals."""
