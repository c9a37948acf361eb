"""The prompt expander (report, "Prompt Expansion"): SFT data from long captions, SFT of an open LLM, GDPO RL
through the images its expansions produce, and ``expand`` for inference."""
