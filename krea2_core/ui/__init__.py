"""``krea2 ui``: browse pipeline runs and re-run single stages in a local web UI (krea2_core/ui/app.py)."""
