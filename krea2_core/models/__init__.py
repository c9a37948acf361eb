"""Models: the Krea 2 DiT and its parts."""
